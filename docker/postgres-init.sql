-- The MLflow backend lives next to Dagster's storage in the same server.
CREATE DATABASE mlflow;
