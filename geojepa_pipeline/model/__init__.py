"""GeoJEPA in plain torch: configs and presets, token embedding with the conditional prior,
masking, encoder and predictor, losses, schedules. Nothing here imports Dagster."""
