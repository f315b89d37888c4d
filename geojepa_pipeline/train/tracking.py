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
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<GEOJEPA_HOME>/mlflow/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(mlflow_dir / 'mlflow.db').resolve()}"


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
        artifacts = (mlflow_dir / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
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
    url = f"{uri} experiment {exp_id} run {run_id}" if not uri.startswith("http") else f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return LoggedModel(run_id, url, name, str(version.version), uri)
