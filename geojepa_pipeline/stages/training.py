"""A GeoJEPA checkpoint without Dagster: train on the regions' tile tokens, store, log and register in MLflow.

``checkpoints/<variant>/<data_version>/`` holds ``model.safetensors`` (best by validation
probe), ``last.safetensors``, ``train_state.json`` (configs, per-epoch monitors) and
``inputs.json`` (every input's data version). Training itself runs in a work directory keyed
by the config and the input versions (``checkpoints/<variant>/.work-<key>``), so a
materialization that was killed resumes from its last checkpoint when started again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import GeojepaError
from ..settings import Settings
from ..store import (
    CHECKPOINTS, GEOMETRY, GLOBAL_SCOPE, IMAGES, INPUTS_FILE, LAST_WEIGHTS_FILE, OSM, TILES, TOKENS, TRAIN_STATE_FILE,
    WEIGHTS_FILE, Dataset, Store, aligned_shards,
)
from ..model.config import VARIANTS
from ..train.checkpoint import MODEL_FILE, STATE_FILE, WorkDir, check_safetensors
from ..train.data import ShardSource
from ..train.loop import TrainConfig, train

CHECKPOINT_SCHEMA_VERSION = 1


@dataclass
class CheckpointOptions:
    """What geojepa_checkpoint trains on and how it runs, beside ``TrainConfig`` (how it trains) and ``Holdout``."""

    regions: list[str] = field(default_factory=list)  # empty: every region with tile_tokens
    processes: int = 1  # > 1: DDP under `torchrun --nproc_per_node` (one per GPU; the run's host needs that many)


def training_sources(store: Store, regions: list[str], with_images: bool = False) -> tuple[list[ShardSource], dict]:
    """Token shards of ``regions`` (with their chip shards when ``with_images``) and every input's data version."""
    sources, inputs = [], {}
    for name in sorted(regions):
        tok, tiles = store.require(TOKENS, name), store.require(TILES, name)
        if tok.manifest["inputs"]["tile_shards"] != tiles.data_version:
            raise GeojepaError(f"tile_tokens[{name}] was built from an older tile_shards version; re-materialize tile_tokens[{name}]")
        images = store.current(IMAGES, name)
        if with_images and (images is None or images.manifest["inputs"]["tile_shards"] != tiles.data_version):
            raise GeojepaError(f"the image variants need tile_images[{name}] built from the current tile_shards; materialize it first")
        sources += [ShardSource(name, *files) for files in aligned_shards(
            (tok, "tokens"), (tiles, "tiles"), (tiles, "entities"), (images if with_images else None, "images"))]
        inputs[f"tile_tokens/{name}"] = tok.data_version
        inputs[f"tile_shards/{name}"] = tiles.data_version
        # the chips the model saw: the current ones for image variants, else those the tokens were built with
        inputs[f"tile_images/{name}"] = images.data_version if with_images else tok.manifest["inputs"].get("tile_images")
        source = tiles.manifest.get("source") or {}  # the extract these tiles were cut from
        inputs[f"osm_sha256/{name}"] = source.get("sha256") or store.current_version(OSM, name)
        inputs[f"osm_uri/{name}"] = source.get("uri")
        used_images = inputs[f"tile_images/{name}"]
        if used_images and used_images in store.versions(IMAGES, name):
            inputs[f"naip_scenes/{name}"] = store.dataset(IMAGES, name, used_images).manifest["inputs"].get("naip_scenes")
        inputs["tag_embeddings"] = tok.manifest["inputs"]["tag_embeddings"]
        inputs["geometry_encoder"] = tok.manifest["inputs"]["geometry_encoder"]
    return sources, inputs


@dataclass
class CheckpointResult:
    dataset: Dataset
    variant: str
    steps: int
    resumed_from: int
    history: dict
    inputs: dict
    mlflow: object
    seconds: float


def train_with_torchrun(cfg: TrainConfig, sources: list[ShardSource], work, processes: int,
                        log: Callable[[str], None] = print):
    """Train under ``torchrun --standalone --nproc_per_node processes`` (DDP: nccl on GPUs, gloo on CPUs).

    The ranks write their resumable checkpoints into ``work``; afterwards this process loads the
    last one (``train`` resumes at the final step and does no more work) to return the result.
    """
    import subprocess
    import sys
    from pathlib import Path

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.to_dict(), "work_dir": str(work), "sources": [s.to_json() for s in sources]}
    spec_path = WorkDir(work).spec
    spec_path.write_text(json.dumps(spec, sort_keys=True) + "\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", f"--nproc_per_node={processes}",
           "-m", "geojepa_pipeline.train.run", str(spec_path)]
    log(f"launching: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # the ranks' progress, as it comes
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith("[rank 0]"):
            log(line)
    if proc.wait() != 0:
        raise GeojepaError(f"torchrun with {processes} processes failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
    checksums = [WorkDir(work).params(rank).read_text().strip() for rank in range(processes)]
    if len(set(checksums)) != 1:  # DDP keeps the replicas equal; if not, the checkpoint would be one rank's guess
        raise GeojepaError(f"the {processes} ranks ended with different parameters ({', '.join(checksums)}); not committed")
    log(f"all {processes} ranks ended with equal parameters (checksum {checksums[0]})")
    return train(cfg, sources, work, log=log)


def train_key(cfg: TrainConfig, inputs: dict) -> str:
    """16 hex digits naming a training by what decides its result: the config (not how a step is compiled) and the inputs.

    Names its resumable work directory, and is stored in the checkpoint's manifest: an unchanged
    re-run finds it there and trains nothing.
    """
    trained = {k: v for k, v in cfg.to_dict().items() if k != "compile"}  # how a step runs does not change what it trains
    return hashlib.sha256(json.dumps({"config": trained, "inputs": inputs}, sort_keys=True).encode()).hexdigest()[:16]


def build_checkpoint(
    variant: str, store: Store, settings: Settings, cfg: TrainConfig, regions: list[str] | None = None,
    tags: dict | None = None, log: Callable[[str], None] = print, processes: int = 1,
    holdout_regions: list[str] | None = None,
) -> CheckpointResult:
    """Train (or resume) GeoJEPA-``variant`` on the regions' tokens; commit the checkpoint; log it to MLflow.

    ``regions`` (default: every region with tile_tokens) minus ``holdout_regions``, which pretraining never
    reads. ``processes`` > 1 trains with DDP under torchrun (one process per GPU, or CPU ranks with gloo).
    """
    cfg = TrainConfig(**{**cfg.to_dict(), "variant": variant})
    with store.exclusive(CHECKPOINTS, variant, log=log):  # one training of a variant at a time; a waiting run may reuse it
        return _train_and_commit(variant, store, settings, cfg, regions, holdout_regions, tags, log, processes)


def _train_and_commit(variant: str, store: Store, settings: Settings, cfg: TrainConfig, regions: list[str] | None,
                      holdout_regions: list[str] | None, tags: dict | None, log: Callable[[str], None],
                      processes: int) -> CheckpointResult:
    """``build_checkpoint`` under the variant's lock: the regions and their tokens are read here, as they are now."""
    from ..train.tracking import git_commit, log_training, registered_version, tracking_uri

    if regions is None:
        regions = store.regions(TOKENS)
    holdout = set(holdout_regions or ())
    regions = [r for r in regions if r not in holdout]
    if not regions:
        raise GeojepaError("no region has tile_tokens (outside the held-out ones); materialize the regions first (geojepa materialize)")
    for name in sorted(holdout):
        tok = store.current(TOKENS, name)
        if tok is not None and name in store.dataset(GEOMETRY, GLOBAL_SCOPE, tok.manifest["inputs"]["geometry_encoder"]).manifest.get("regions", []):
            raise GeojepaError(f"held-out region {name!r}: its tile_tokens use a geometry encoder pretrained on it; materialize "
                               f"geometry_encoder and tile_tokens with it held out (geojepa materialize --holdout {name})")

    sources, inputs = training_sources(store, regions, with_images=VARIANTS[variant].images)
    key = train_key(cfg, inputs)
    uri = tracking_uri(settings.mlflow_dir)
    t0 = time.perf_counter()
    current = store.current(CHECKPOINTS, variant)
    if current is not None and current.manifest.get("train_key") == key:  # the same config on the same inputs
        logged = registered_version(uri, variant, current.data_version)
        if logged is not None:
            state = json.loads(current.file(TRAIN_STATE_FILE).read_text())
            log(f"GeoJEPA-{variant}: unchanged (same config and inputs): {current.path} (MLflow {logged.model_name} v{logged.version})")
            history = {"loss": state["losses"], "epoch": state["epochs"]}
            return CheckpointResult(current, variant, state["steps"], state["steps"], history, inputs, logged,
                                    time.perf_counter() - t0)
    work = store.work_dir(CHECKPOINTS, variant, key)
    if processes > 1:
        result = train_with_torchrun(cfg, sources, work, processes, log=log)
    else:
        result = train(cfg, sources, work, log=log)
    for weights in (result.best / MODEL_FILE, result.last / MODEL_FILE):
        check_safetensors(weights)  # never commit (nor register) a file a model cannot load
    with store.writing(CHECKPOINTS, variant) as staging:
        shutil.copyfile(result.best / MODEL_FILE, staging.file(WEIGHTS_FILE))
        shutil.copyfile(result.last / MODEL_FILE, staging.file(LAST_WEIGHTS_FILE))
        state = json.loads((result.last / STATE_FILE).read_text())
        staging.file(TRAIN_STATE_FILE).write_text(json.dumps(
            {"train_config": state["train_config"], "model_config": state["model_config"], "epochs": state["history"]["epoch"],
             "steps": result.steps, "best_probe": state.get("best_probe"), "losses": state["history"]["loss"]},
            sort_keys=True, default=float) + "\n")
        staging.file(INPUTS_FILE).write_text(json.dumps(inputs, sort_keys=True) + "\n")
        staging.manifest = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "variant": variant, "regions": sorted(regions),
                            "inputs": inputs, "steps": result.steps, "train_config": cfg.to_dict(), "train_key": key}
    dataset = staging.dataset
    logged = registered_version(uri, variant, dataset.data_version)  # the same bytes as a version already registered
    if logged is None:
        last_epoch = result.history["epoch"][-1] if result.history["epoch"] else {}
        lineage = {**(tags or {}), "geojepa.data_version": dataset.data_version, "geojepa.git_commit": git_commit(),
                   **{f"input.{k}": v for k, v in inputs.items()}}
        logged = log_training(
            uri, settings.mlflow_dir, variant,
            {**{f"train.{k}": v for k, v in cfg.to_dict().items()}, **{f"model.{k}": v for k, v in state["model_config"].items()},
             "regions": ",".join(sorted(regions))},
            result.history, {"best": result.best, "last": result.last}, lineage,
            {k: v for k, v in last_epoch.items() if isinstance(v, (int, float))},
        )
    shutil.rmtree(work, ignore_errors=True)  # committed and logged: the resumable state has done its job
    log(f"GeoJEPA-{variant}: {dataset.path} (MLflow {logged.model_name} v{logged.version}, run {logged.run_id})")
    return CheckpointResult(dataset, variant, result.steps, result.resumed_from, result.history, inputs, logged,
                            time.perf_counter() - t0)

