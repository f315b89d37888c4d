"""Faults: the store is tamper-evident, a training commits only what a model can load, a home is relocatable (issue 19, items 3 and 4)."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geojepa_pipeline.cli import main

from ..conftest import snapshot
from ..test_cli import one_line_error, run

UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


@pytest.fixture(scope="module")
def tokens_template(tmp_path_factory):
    """A home with pyrosm's test extract materialized up to tile_tokens (copied by each test)."""
    import os

    home = tmp_path_factory.mktemp("tamper") / "home"
    saved = {k: os.environ.pop(k, None) for k in ("GEOJEPA_HOME", "DAGSTER_HOME", "GEOJEPA_STORE")}
    os.environ["GEOJEPA_HOME"] = str(home)
    try:
        assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none"]) == 0
        assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    finally:
        os.environ.pop("GEOJEPA_HOME")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    return home


@pytest.fixture
def tokens_home(tokens_template, home):
    shutil.copytree(tokens_template, home)
    return home


def _store(home):
    from geojepa_pipeline.store import Store

    return Store(home / "store")


def test_a_bit_flip_in_checkpoint_weights_is_refused_by_evaluation_lineage_and_verify(tokens_home, capsys):
    from geojepa_pipeline.store import CHECKPOINTS, REPORTS, WEIGHTS_FILE

    assert run(capsys, "materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "2")[0] == 0
    ck = _store(tokens_home).current(CHECKPOINTS, "GT")
    weights = ck.file(WEIGHTS_FILE)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    code, _, err = run(capsys, "materialize", "--select", "evaluation_report", "--variant", "GT")
    assert code == 2
    assert (f"{ck.label}: model.safetensors does not match the sha256 its manifest recorded: it was changed after it was "
            "written; re-materialize geojepa_checkpoint[GT] (full log: ") in one_line_error(err), err
    assert _store(tokens_home).current(REPORTS, "GT") is None  # nothing was scored with the damaged weights
    code, out, _ = run(capsys, "lineage", "GT")
    assert code == 0 and "DAMAGED: 1 file(s) differ from the manifest's sha256 (model.safetensors does not match" in out
    assert "(readable)" not in out.split("checkpoint    ")[1].splitlines()[0]
    code, out, err = run(capsys, "verify")
    assert code == 1 and f"{ck.label}" in out and "model.safetensors does not match the sha256" in out
    assert "1 dataset version(s) damaged" in err
    code, out, _ = run(capsys, "verify", "t")  # the region's own datasets are intact
    assert code == 0 and "tiles/t@" in out and "checkpoints" not in out and "verified " in out


def test_training_refuses_to_commit_weights_that_are_not_safetensors(tokens_home, capsys):
    """A pickle where the work dir's best weights should be is never committed nor registered; once the work dir goes, a re-run works."""
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.store import CHECKPOINTS
    from geojepa_pipeline.stages.training import build_checkpoint, train_key, training_sources
    from geojepa_pipeline.train.checkpoint import MODEL_FILE
    from geojepa_pipeline.train.loop import TrainConfig, train
    from geojepa_pipeline.train.tracking import registered_version, tracking_uri

    store, settings = _store(tokens_home), get_settings()
    cfg = TrainConfig(preset="tiny", epochs=2, batch_size=16, variant="T")
    sources, inputs = training_sources(store, ["t"])
    work = store.work_dir(CHECKPOINTS, "T", train_key(cfg, inputs))  # where build_checkpoint resumes
    done = train(cfg, sources, work, log=lambda m: None)
    (done.best / MODEL_FILE).write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    before = snapshot(tokens_home / "store")
    with pytest.raises(Exception, match=r"model.safetensors is not a valid safetensors file \(Error while deserializing header"):
        build_checkpoint("T", store, settings, cfg, log=lambda m: None)
    assert store.current(CHECKPOINTS, "T") is None and snapshot(tokens_home / "store") == before
    shutil.rmtree(work)
    result = build_checkpoint("T", store, settings, cfg, log=lambda m: None)
    assert result.mlflow.version == "1" and store.current(CHECKPOINTS, "T") == result.dataset
    assert registered_version(tracking_uri(settings.mlflow_dir), "T", result.dataset.data_version).version == "1"


def test_an_unchanged_checkpoint_registers_no_new_version_and_leaves_no_work_dir(tokens_home, capsys):
    from geojepa_pipeline.store import CHECKPOINTS

    argv = ["materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "2"]
    assert run(capsys, *argv)[0] == 0
    first = _store(tokens_home).current(CHECKPOINTS, "GT")
    assert not list((tokens_home / "store" / CHECKPOINTS / "GT").glob(".work-*"))  # committed: the work dir went
    code, out, err = run(capsys, *argv)
    full_log = max((tokens_home / "logs").glob("materialize-*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert code == 0 and "unchanged (same config and inputs)" in full_log
    assert _store(tokens_home).current(CHECKPOINTS, "GT") == first
    code, out, _ = run(capsys, "lineage", "GT")
    assert "geojepa-GT:1" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tokens_home / 'mlflow' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='geojepa-GT'")] == ["1"]


def test_an_evaluation_in_a_copied_home_leaves_the_original_byte_identical(tokens_home, capsys, tmp_path):
    assert run(capsys, "materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "2")[0] == 0
    copy = tmp_path / "copied_home"
    shutil.copytree(tokens_home, copy)
    before = snapshot(tokens_home)
    exe = Path(sys.executable).parent / "geojepa"  # a new process, as a user working in the copy would start
    proc = subprocess.run([str(exe), "materialize", "--select", "evaluation_report", "--variant", "GT"], capture_output=True,
                          text=True, env={**os.environ, "GEOJEPA_HOME": str(copy)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(tokens_home) == before  # MLflow wrote the report into the copy's artifacts, not the original's
    logged = list((copy / "mlflow" / "artifacts").rglob("evaluation/metrics.json"))
    assert len(logged) == 1 and logged[0].read_bytes() == next((copy / "store" / "reports" / "GT").glob("*/metrics.json")).read_bytes()
    from mlflow.tracking import MlflowClient

    from geojepa_pipeline.train.tracking import tracking_uri

    client = MlflowClient(tracking_uri(copy / "mlflow"))
    version = client.get_model_version("geojepa-GT", "1")
    assert version.source.startswith((copy / "mlflow" / "artifacts").resolve().as_uri())
    assert client.get_run(version.run_id).info.artifact_uri.startswith((copy / "mlflow" / "artifacts").resolve().as_uri())
