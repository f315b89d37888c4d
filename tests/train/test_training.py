"""Training: spatial split, length buckets, exact resume after a crash, kill -9 + resume, DDP on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
from geojepa_pipeline.regions import Region
from geojepa_pipeline.store import Store
from geojepa_pipeline.geo.splits import SPLIT_BLOCK_TILES
from geojepa_pipeline.train.checkpoint import WorkDir
from geojepa_pipeline.train.data import ShardSource, TileSequences, bucketed_batches
from geojepa_pipeline.train.loop import TrainConfig, train

from ..conftest import bench_module


BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Token shards of pyrosm's test extract (70 tiles), built through the real pipeline."""
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tag_embeddings, build_tile_tokens

    store = Store(tmp_path_factory.mktemp("store"))
    fetch_extract(Region.create("t", "pyrosm:test"), store)
    build_tile_shards("t", store)
    build_tag_embeddings(store, ["t"])
    build_geometry_encoder(store, ["t"], steps=5, max_pieces=500)
    build_tile_tokens("t", store)
    tok, tiles = store.current("tokens", "t"), store.current("tiles", "t")
    return [ShardSource("t", *files) for files in zip(tok.shards("tokens"), tiles.shards("tiles"), tiles.shards("entities"))]


def test_split_is_by_spatial_blocks_and_batches_by_length(sources):
    ids = {split: {s[0] for s in TileSequences(sources, split)} for split in ("train", "val", "test")}
    assert all(ids.values()) and sum(map(len, ids.values())) == len(set().union(*ids.values())) == 70
    block = lambda tid: tuple(int(v) // SPLIT_BLOCK_TILES for v in tid.split("_")[1:])  # noqa: E731
    blocks = {split: {block(t) for t in v} for split, v in ids.items()}
    assert not blocks["train"] & blocks["val"] and not blocks["train"] & blocks["test"] and not blocks["val"] & blocks["test"]
    for batch in bucketed_batches(TileSequences(sources, "train", max_tokens=64), 8, 64):
        n = batch["valid"].sum(1)
        length = batch["valid"].shape[1]
        assert length in (16, 32, 64) and n.max() <= length and (length == 16 or n.max() > length // 2)
        assert batch["tag"].shape == (len(n), length, 384) and batch["geometry"].shape[2] == 64


def test_padded_batches_have_one_shape_per_bucket_and_count_real_tiles(sources):
    seqs = list(TileSequences(sources, "train", max_tokens=64))
    batches = list(bucketed_batches(iter(seqs), 8, 64, pad=True))
    assert all(b["valid"].shape[0] == 8 for b in batches)
    assert sum(b["n_tiles"] for b in batches) == len(seqs)  # every tile once; padding is not counted
    assert sum(b["n_tiles"] < 8 for b in batches) <= 1  # leftovers move up a bucket: one partial batch at most
    last = batches[-1]
    n = last["n_tiles"]
    assert not last["valid"][n:].any() and len(last["tile_id"]) == n == len(last["buildings"])
    unpadded = list(bucketed_batches(iter(seqs), 8, 64))
    assert [b["valid"].shape[0] for b in unpadded][-1] == n
    # the step count needs no pass over the data: ceil(tiles / batch) for any shuffle, per rank
    for rank in (0, 1):
        for shuffle in (None, 3):
            seq = TileSequences(sources, "train", max_tokens=64, rank=rank, world=2, shuffle=shuffle)
            tiles = list(seq)
            assert seq.count() == len(tiles) and len(list(bucketed_batches(iter(tiles), 8, 64, pad=True))) == -(-len(tiles) // 8)


def test_probe_tiles_are_spread_through_the_split_whatever_the_batch_size(sources):
    """The epoch-end probe embeds min(tiles, limit) tiles chosen evenly before batching: the same tiles at any
    batch size (cutting the length-bucketed stream at the limit kept whichever buckets filled first)."""
    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.train.loop import embed_tiles

    cfg = TrainConfig(max_tokens=64)
    seqs = list(TileSequences(sources, "train", max_tokens=64))
    sampled = TileSequences(sources, "train", max_tokens=64, sample=20)
    picked = [s[0] for s in sampled]
    index = [[s[0] for s in seqs].index(t) for t in picked]
    assert sampled.count() == len(picked) == 20 and index == sorted(index)
    assert max(b - a for a, b in zip([-1] + index, index + [len(seqs)])) <= -(-len(seqs) // 20)  # no gap over one run
    assert len(list(TileSequences(sources, "train", max_tokens=64, sample=10_000))) == len(seqs)
    full = {s[0]: s for s in seqs}  # a sample decodes only its own tiles (read_shard_rows): the same tokens as a whole shard's
    for item in TileSequences(sources, "train", max_tokens=64, sample=20):
        for j in (1, 2, 3):
            np.testing.assert_array_equal(item[j], full[item[0]][j])
        assert item[4] == full[item[0]][4]
    expected = sorted(s[4] for s in seqs if s[0] in set(picked))
    model = GeoJEPA(model_config("tiny", "GT"))
    for batch_size in (4, 256):
        x, buildings = embed_tiles(model, sources, "train", cfg, limit=20, batch_size=batch_size)
        assert x.shape == (20, 2 * model.cfg.dim) and sorted(buildings.tolist()) == expected
    x, _ = embed_tiles(model, sources, "train", cfg, limit=10_000)
    assert len(x) == len(seqs)


def test_compiled_step_serves_several_length_buckets_with_one_graph():
    """TrainStep(compile="default") compiles the length as a symbol: buckets 16, 32 and 64 share one inductor
    graph (a recompile would raise), and each computes what the eager step computes (no dropout or noise)."""
    import copy

    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.train.loop import TrainStep

    torch.manual_seed(0)
    cfg = model_config("tiny", "GT", dropout=0.0, modality_dropout=0.0, position_noise=0.0)
    models = [GeoJEPA(cfg)]
    models.append(copy.deepcopy(models[0]))
    steps = [TrainStep(m, m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3), torch.device("cpu"), mode)
             for m, mode in zip(models, ("none", "default"))]
    torch._dynamo.reset()
    for i, length in enumerate((16, 32, 64)):
        b = bench_module("compile_time").synthetic_batch(cfg, 8, length, i)
        eager = steps[0](b, 1e-3, 0.04, 0.99)["stats"]
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled = steps[1](b, 1e-3, 0.04, 0.99)["stats"]
        # after the first step the models have taken their own AdamW steps: agreement checks those too
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5), (length, eager, compiled)


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    """Regression: the worker blocked for good putting its end marker on a full queue; close() then waited 30 s."""
    import threading

    from geojepa_pipeline.train.data import prefetch

    before = threading.active_count()
    batches = prefetch(iter(range(3)), depth=2)
    assert next(batches) == 0
    time.sleep(0.3)  # the worker has produced everything and is waiting to hand over the end marker
    t0 = time.monotonic()
    batches.close()
    assert time.monotonic() - t0 < 5 and threading.active_count() == before


@pytest.mark.parametrize("seed,split_seed", [(0, 0), (22, 0), (5, 3)])
def test_no_test_tile_reaches_a_training_batch_or_the_checkpoint_choice(sources, tmp_path, monkeypatch, seed, split_seed):
    """Every tile ``train`` reads, for its steps and for its epoch-end probe (the best-checkpoint choice), is a train
    or validation tile of ``geo.splits``, the split evaluation tests on; the probe is scored on validation tiles only.
    (Before: training and evaluation hashed the same string, and for seed 22 training validated on the test set.)"""
    import pyarrow.parquet as pq

    import geojepa_pipeline.train.loop as loop
    from geojepa_pipeline.geo.splits import TEST, VAL, tile_split

    seen: list[tuple[str, str]] = []

    class Recording(loop.TileSequences):
        def __iter__(self):
            for item in super().__iter__():
                seen.append((self.split, item[0]))
                yield item

    monkeypatch.setattr(loop, "TileSequences", Recording)
    result = train(TrainConfig(epochs=2, batch_size=16, max_tokens=32, seed=seed, split_seed=split_seed), sources,
                   tmp_path / "w", log=lambda m: None)
    tiles = pq.read_table(sources[0].tiles_file, columns=["tile_id", "tile_x", "tile_y", "epsg"])
    split = tile_split(tiles.column("epsg")[0].as_py(), tiles.column("tile_x").to_numpy(), tiles.column("tile_y").to_numpy(), split_seed)
    ids = np.array(tiles.column("tile_id").to_pylist())
    test_ids, val_ids = set(ids[split == TEST]), set(ids[split == VAL])
    assert test_ids and val_ids and result.steps > 0 and len(result.history["epoch"]) == 2
    assert {s for s, _ in seen} == {"train", "val"} and not {t for _, t in seen} & test_ids
    assert {t for s, t in seen if s == "val"} == val_ids  # the probe (checkpoint choice) is scored on validation tiles
    assert not {t for s, t in seen if s == "train"} & val_ids


class Crash(Exception):
    pass


def test_resume_after_a_crash_gives_the_same_model(sources, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, ckpt_every=3, max_tokens=64)
    straight = train(cfg, sources, tmp_path / "a", log=lambda m: None)

    def crash(step, _):
        if step == 7:
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, sources, tmp_path / "b", log=lambda m: None, on_step=crash)
    resumed = train(cfg, sources, tmp_path / "b", log=lambda m: None)
    assert resumed.resumed_from == 6 and resumed.steps == straight.steps
    assert resumed.param_checksum == straight.param_checksum  # bit-identical: data order, RNG and optimizer restored
    assert (tmp_path / "b" / "last" / "model.safetensors").exists() and (tmp_path / "b" / "best" / "state.json").exists()
    epochs = resumed.history["epoch"]
    assert len(epochs) == 2 and all(e["target_std_mean"] > 0.05 for e in epochs)


def _spec(tmp_path, sources, work, **cfg):
    spec = {"config": TrainConfig(**cfg).to_dict(), "work_dir": str(work),
            "sources": [s.to_json() for s in sources]}
    path = tmp_path / f"spec-{work.name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(sources, tmp_path):
    work = tmp_path / "work"
    spec = _spec(tmp_path, sources, work, epochs=40, batch_size=4, ckpt_every=2, max_tokens=64)
    cmd = [sys.executable, "-m", "geojepa_pipeline.train.run", str(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(WorkDir(work).steps.glob("step-*"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted(WorkDir(work).steps.glob("step-*"))
    assert done, "no checkpoint was written before the kill"
    killed_at = int(done[-1].name.split("-")[1])
    assert killed_at > 0
    # a new run with the same work dir resumes (here with a step budget a little past the kill)
    spec2 = _spec(tmp_path, sources, work, epochs=40, batch_size=4, ckpt_every=2, max_tokens=64, max_steps=killed_at + 4)
    out = subprocess.run([sys.executable, "-m", "geojepa_pipeline.train.run", str(spec2)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = int(out.stdout.split("resumed from step ")[1].split()[0])
    assert resumed == killed_at  # the newest complete checkpoint, not step 0
    assert f"done: {killed_at + 4} steps" in out.stdout


def test_ddp_two_cpu_ranks_end_with_identical_parameters(sources, tmp_path):
    work = tmp_path / "ddp"
    spec = _spec(tmp_path, sources, work, epochs=1, batch_size=4, ckpt_every=1000, max_tokens=32, max_steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "geojepa_pipeline.train.run", str(spec)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [WorkDir(work).params(r).read_text().strip() for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 64
    assert "on 2 process(es)" in out.stdout


def test_image_variant_streams_chips_with_the_tokens(sources, tmp_path):
    """TI: chips come from the tile_images shard aligned with the tokens, one row group at a time."""
    import shutil

    from geojepa_pipeline.stages.imagery import build_naip_scenes, build_tile_images, decode_chip

    store_root = tmp_path / "store"
    shutil.copytree(sources[0].tiles_file.parents[3], store_root)  # the fixture's store
    store = Store(store_root)
    build_naip_scenes(Region.create("t", "pyrosm:test"), store)
    images = build_tile_images("t", store)
    from geojepa_pipeline.stages.training import training_sources

    with_chips, _ = training_sources(store, ["t"], with_images=True)
    seqs = list(TileSequences(with_chips, "train", max_tokens=32, shuffle=1, with_images=True))
    import pyarrow.parquet as pq

    table = pq.read_table(with_chips[0].images_file)
    by_id = dict(zip(table.column("tile_id").to_pylist(), table.column("image").to_pylist()))
    assert seqs and all(s[5] is not None for s in seqs) and images.n_with_image == 70
    assert all((s[5] == decode_chip(by_id[s[0]])).all() for s in seqs[:5])  # the right chip for the tile
    assert {s[0] for s in seqs} == {s[0] for s in TileSequences(with_chips, "train", max_tokens=32)}
    for rank in (0, 1):  # each DDP rank's share of the chips, counted without reading them
        mine = TileSequences(with_chips, "train", max_tokens=32, rank=rank, world=2, shuffle=1, with_images=True)
        assert mine.count() == len(list(mine))
    sampled = list(TileSequences(with_chips, "train", max_tokens=32, with_images=True, sample=10))  # the probe's read
    assert [s[0] for s in sampled] == [s[0] for s in TileSequences(with_chips, "train", max_tokens=32, sample=10)]
    assert len(sampled) == 10 and all((s[5] == decode_chip(by_id[s[0]])).all() for s in sampled)
    batch = next(bucketed_batches(iter(seqs), 4, 32))
    assert batch["images"].shape == (4, 224, 224, 4) and batch["has_image"].all()
    result = train(TrainConfig(variant="TI", epochs=1, batch_size=4, max_tokens=32, max_steps=2),
                   with_chips, tmp_path / "ti", log=lambda m: None)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.history["loss"])).all()


def test_throughput_bench_runs_on_exported_shards(sources, tmp_path):
    """bench/train_throughput.py --export / --sources (the GPU run's path): real loader vs in memory, with a ratio."""
    bench = BENCH / "train_throughput.py"
    module = bench_module("train_throughput")
    module.export_sources(sources, tmp_path / "shards")
    assert [s.tokens_file.read_bytes() for s in module.load_sources(tmp_path / "shards")] == [s.tokens_file.read_bytes() for s in sources]
    out = subprocess.run([sys.executable, str(bench), "--sources", str(tmp_path / "shards"), "--steps", "4", "--batch", "4",
                          "--max-tokens", "32", "--device", "cpu", "--flops"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in out.stdout.splitlines() if "tiles/s" in line}
    assert {"loader alone", "in memory", "real loader"} <= set(lines)
    assert "4 batches, 16 tiles" in lines["in memory"] and "loader ratio (real / in memory, tiles/s) = " in out.stdout
    assert "TFLOP/s" in lines["in memory"] and "TFLOP/s" in lines["real loader"] and "TFLOP/s" not in lines["loader alone"]
    assert re.search(r"step FLOPs: [0-9.]+ GFLOP/tile on this run's batches \([0-9.]+ tokens stepped per real tile", out.stdout)


def test_compile_time_bench_compares_symbolic_and_static_lengths():
    """bench/compile_time.py runs both ways and prints their totals and ratio (one length here, to stay quick;
    test_compiled_step_serves_several_length_buckets_with_one_graph checks the graph sharing)."""
    out = subprocess.run([sys.executable, str(BENCH / "compile_time.py"), "--preset", "tiny", "--batch", "2", "--lengths", "16", "--steps", "2",
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for way in ("symbolic length", "static lengths"):
        assert re.search(way + r": length   16: first step +[0-9.]+ s, then [0-9.]+ s/step \(graphs so far: 1\)", out.stdout)
        assert f"{way}: 1 lengths x 2 steps in" in out.stdout
    assert re.search(r"compile \+ steps: symbolic [0-9.]+ s, static [0-9.]+ s, ratio [0-9.]+", out.stdout)


def test_step_flops_count_every_matmul_of_forward_and_backward():
    """bench's step_flops: linear in the batch, attention counted (more than linear in the length), and the
    encoder's dense layers alone (2 x in x out per token: forward once, backward twice) are a lower bound."""
    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA

    module, batches = bench_module("train_throughput"), bench_module("compile_time")
    cfg = model_config("tiny", "GT")
    model = GeoJEPA(cfg)
    f = {(b, n): module.step_flops(model, batches.synthetic_batch(cfg, b, n, 0)) for b, n in [(2, 16), (4, 16), (2, 32)]}
    assert f[(4, 16)] == 2 * f[(2, 16)]
    assert f[(2, 32)] > 2 * f[(2, 16)]  # the attention scores grow with the square of the length
    dense = sum(m.in_features * m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert f[(2, 16)] > 2 * 16 * dense * 2 * (1 + 2)  # the context encoder's forward + backward alone
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind
