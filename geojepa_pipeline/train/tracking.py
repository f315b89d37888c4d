"""MLflow: log a training run (params, metrics, checkpoint artifacts) and register it as a model version.

The embedded default is a SQLite backend with local artifacts under ``GEOJEPA_HOME/mlflow``;
``MLFLOW_TRACKING_URI`` overrides it. Models are registered as ``geojepa-<variant>``; the run
and the version carry the lineage tags (Dagster run id, code version, input data versions,
git commit).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT = "geojepa"


def tracking_uri(mlflow_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<GEOJEPA_HOME>/mlflow/mlflow.db`` (its artifacts beside it).

    MLflow stores absolute artifact locations; a home that was copied or moved has its database's
    locations rebased onto this home first (``rebase_artifacts``), so it never writes into the original.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    db = (mlflow_dir / "mlflow.db").resolve()
    if db.exists():
        rebase_artifacts(db, artifacts_uri(mlflow_dir))
    return f"sqlite:///{db}"


def artifacts_uri(mlflow_dir: Path) -> str:
    """Where the embedded MLflow keeps artifacts: ``file://<GEOJEPA_HOME>/mlflow/artifacts``."""
    return (mlflow_dir / "artifacts").resolve().as_uri()


# (table, column) of every artifact location MLflow's SQL store keeps (tables of older or newer MLflow may lack some)
_ARTIFACT_COLUMNS = [("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                     ("model_versions", "storage_location"), ("logged_models", "artifact_location")]


def rebase_artifacts(db: Path, artifacts: str) -> int:
    """Point the artifact locations in the MLflow database ``db`` at ``artifacts`` when they name another home's.

    Only locations under the ``geojepa`` experiment's own ``.../mlflow/artifacts`` are rewritten (one
    transaction); a location a user chose elsewhere is left alone. Returns the rows changed.
    """
    import sqlite3

    con = sqlite3.connect(db)
    try:
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        except sqlite3.OperationalError:  # MLflow has not created its tables yet
            return 0
        old = row[0] if row else None
        if not old or old == artifacts or not old.endswith("/mlflow/artifacts"):
            return 0
        changed = 0
        with con:
            for table, column in _ARTIFACT_COLUMNS:
                columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                if column in columns:
                    changed += con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (artifacts, len(old) + 1, len(old), old)).rowcount
        try:  # MLflow caches each run's artifact location in process: drop what it learnt from the other home
            from mlflow.tracking._tracking_service import utils as mlflow_utils

            mlflow_utils._artifact_repos_cache.clear()
        except (ImportError, AttributeError):
            pass
        return changed
    finally:
        con.close()


def git_commit(repo: Path | None = None) -> str | None:
    """The project's git commit when the code runs from a checkout, else None."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class LoggedModel:
    run_id: str
    run_url: str
    model_name: str
    version: str
    tracking_uri: str


def log_training(uri: str, mlflow_dir: Path, variant: str, params: dict, history: dict, checkpoint_dirs: dict[str, Path],
                 tags: dict[str, str], final_metrics: dict[str, float]) -> LoggedModel:
    """One MLflow run with params, per-step and per-epoch metrics and the checkpoints; a new registered version."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # not mlflow.set_tracking_uri: it would export MLFLOW_TRACKING_URI to the process
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = artifacts_uri(mlflow_dir) if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    clean_tags = {k: str(v) for k, v in tags.items() if v is not None}
    run = client.create_run(exp_id, run_name=f"geojepa-{variant}", tags=clean_tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in sorted(params.items())])
        metrics = [Metric("loss", float(v), 0, i) for i, v in enumerate(history.get("loss", []))]
        metrics += [Metric("smooth_l1", float(v), 0, i) for i, v in enumerate(history.get("smooth_l1", []))]
        for rec in history.get("epoch", []):
            for k, v in rec.items():
                if k not in ("epoch", "step") and v == v:  # skip NaN
                    metrics.append(Metric(f"epoch/{k}", float(v), 0, int(rec["epoch"])))
        metrics += [Metric(f"final/{k}", float(v), 0, 0) for k, v in final_metrics.items() if v == v]
        for start in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[start:start + 900])
        for name, path in checkpoint_dirs.items():
            client.log_artifacts(run_id, str(path), artifact_path=f"checkpoint/{name}")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    name = f"geojepa-{variant}"
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description=f"GeoJEPA-{variant} checkpoints (best by validation probe)")
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint/best"
    version = client.create_model_version(name, source, run_id=run_id, tags=clean_tags)
    return LoggedModel(run_id, _run_url(uri, exp_id, run_id), name, str(version.version), uri)


def _run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{uri} experiment {experiment_id} run {run_id}" if not uri.startswith("http") else f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def registered_version(uri: str, variant: str, data_version: str) -> LoggedModel | None:
    """The newest model version registered for the checkpoint ``data_version`` (its ``geojepa.data_version`` tag), or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    name = f"geojepa-{variant}"
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: -int(v.version)):
        if v.tags.get("geojepa.data_version") == data_version:
            exp_id = client.get_run(v.run_id).info.experiment_id
            return LoggedModel(v.run_id, _run_url(uri, exp_id, v.run_id), name, str(v.version), uri)
    return None
