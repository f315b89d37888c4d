"""Compile time of the training step: the length as a symbol (what training does) vs one static graph per bucket.

    python bench/compile_time.py [--preset thesis|tiny] [--batch 8] [--lengths 16 32 64 128] [--steps 3]
                                 [--device cpu|cuda] [--compile default|reduce-overhead]

In one process, for each way in turn (symbolic, then static): a fresh model and ``train.loop.TrainStep``,
``torch._dynamo.reset()``, then ``--steps`` steps at each length (synthetic tiles, masks from
``draw_masks``). Inductor's on-disk caches are off, so each way compiles cold; a tiny model is compiled
first, so the process's one-time compiler start-up is in neither timing. Prints, per length, the
first step (compiling) and the later steps, the number of graphs dynamo captured, and the totals with
their ratio. Step times show whether a symbolic length costs anything once compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_batch(cfg, batch: int, length: int, seed: int) -> dict:
    """A masked batch of ``batch`` tiles padded to ``length``, each with 2..length valid tokens."""
    from geojepa_pipeline.model.geojepa import draw_masks

    g = torch.Generator().manual_seed(seed)
    raw = {"tag": torch.randn(batch, length, cfg.tag_dim, generator=g),
           "geometry": torch.randn(batch, length, cfg.geometry_dim, generator=g),
           "position": torch.rand(batch, length, 8, generator=g),
           "valid": torch.arange(length)[None] < torch.randint(2, length + 1, (batch, 1), generator=g)}
    return draw_masks(raw, cfg, seed)


def run(args, symbolic: bool) -> float:
    """Step every length ``args.steps`` times with a fresh compiled step; print and return the total seconds."""
    from torch._dynamo.utils import counters

    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.train.loop import TrainStep

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = model_config(args.preset, "GT")
    device = torch.device(args.device)
    model = GeoJEPA(cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    step = TrainStep(model, model, opt, device, args.compile, symbolic_length=symbolic)
    name = "symbolic length" if symbolic else "static lengths"
    t_all = time.perf_counter()
    for length in args.lengths:
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            step(synthetic_batch(cfg, args.batch, length, i), 1e-4, 0.04, 0.999)["stats"].cpu()
            times.append(time.perf_counter() - t)
        later = sum(times[1:]) / max(1, len(times) - 1)
        print(f"{name}: length {length:4d}: first step {times[0]:7.1f} s, then {later:.3f} s/step "
              f"(graphs so far: {counters['stats']['unique_graphs']})", flush=True)
    total = time.perf_counter() - t_all
    print(f"{name}: {len(args.lengths)} lengths x {args.steps} steps in {total:.1f} s, "
          f"{counters['stats']['unique_graphs']} graph(s) compiled", flush=True)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="thesis", choices=["tiny", "thesis"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default="default", choices=["default", "reduce-overhead"])
    args = p.parse_args()
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = False  # cold compiles for both ways, in one process
    inductor.autotune_local_cache = False
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    warm = torch.nn.Linear(4, 4).to(args.device)  # the process's one-time compiler start-up, outside both timings
    torch.compile(warm)(torch.randn(2, 4, device=args.device)).sum().backward()
    symbolic = run(args, True)
    static = run(args, False)
    print(f"compile + steps: symbolic {symbolic:.1f} s, static {static:.1f} s, ratio {symbolic / static:.2f} "
          f"({args.preset}, batch {args.batch}, {args.device}, compile {args.compile})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
