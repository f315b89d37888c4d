"""Wall time and peak memory of each stage, as ``geojepa materialize`` runs it, on the N x N replicated Liechtenstein.

    python bench/stages.py [--n 16] [--epochs 1] [--stages osm_extract,tile_shards,...] [--home DIR]

Registers the replicated extract (``bench/ingest.py`` builds and caches it) as region ``bench`` in a fresh
GEOJEPA_HOME (``--home`` to keep it), then materializes one asset at a time, each in its own
``geojepa materialize --select key:<asset>`` process, and samples that process tree's memory every 0.5 s
(``bench/memtrace.py``: the largest PSS sum at once). Images are off (``--imagery none``), so training runs
the GT variant (geometry and tags), ``tiny``, eager, for ``--epochs`` epochs. This is the sizing table of the
README's *Running at scale*.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ingest import DEFAULT_SRC, replicated  # noqa: E402
from memtrace import TreeMemory  # noqa: E402

STAGES = ("osm_extract", "tile_shards", "tag_embeddings", "geometry_encoder", "tile_tokens", "geojepa_checkpoint")
GEOJEPA = Path(sys.executable).parent / "geojepa"


def run_stage(home: Path, stage: str, epochs: int) -> dict:
    """One ``geojepa materialize`` of ``stage``: wall seconds and the peak memory of its process tree."""
    extra = ["--variant", "GT", "--preset", "tiny", "--compile", "none", "--epochs", str(epochs)] if stage == "geojepa_checkpoint" else []
    cmd = [str(GEOJEPA), "--home", str(home), "materialize", "--region", "bench", "--select", f"key:{stage}", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(pid=proc.pid) as mem:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return {"stage": stage, "wall_s": wall, "peak_mb": mem.peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description="per-stage wall time and peak memory")
    ap.add_argument("--n", type=int, default=16, help="N for the N x N replicated extract")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of geojepa_checkpoint")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated assets, in order")
    ap.add_argument("--home", type=Path, help="GEOJEPA_HOME to use and keep (default: a temporary one)")
    args = ap.parse_args()
    pbf = replicated(DEFAULT_SRC, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        subprocess.run([str(GEOJEPA), "--home", str(home), "regions", "add", "bench", "--osm", str(pbf), "--imagery", "none",
                        "--replace"], check=True, capture_output=True, text=True)
        print(f"file: {pbf.name} ({pbf.stat().st_size / 2**20:.1f} MiB), GEOJEPA_HOME {home}", flush=True)
        print(f"{'stage':20s} {'wall s':>8s} {'peak memory MB':>15s}", flush=True)
        for stage in [s for s in args.stages.split(",") if s]:
            r = run_stage(home, stage, args.epochs)
            print(f"{stage:20s} {r['wall_s']:8.1f} {r['peak_mb']:15,.0f}", flush=True)


if __name__ == "__main__":
    main()
