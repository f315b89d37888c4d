"""Ingestion benchmark: this project's tiling vs the naive pyrosm + geopandas.overlay baseline.

    python bench/ingest.py [--n 8] [--scaling 1,2,4,8] [--skip-baseline] [--no-quackosm] [--clip W,S,E,N] [--blocks BLOCK_TILES]

Builds the N x N replicated Liechtenstein extract (``bench/replicate.py``; cached under
``bench/_cache``), then, in one invocation, runs each approach in its own subprocess on the
same file and prints wall time, peak memory and the ratio. Peak memory is the largest PSS of the run's
process tree at once, sampled every 0.5 s (``bench/memtrace.py``); ``peak RSS bound`` is the older upper
bound, the run's own peak RSS plus its largest child's. The scaling table runs this project's
ingestion on 1x1 ... NxN copies and prints seconds per 1,000 input features.

Baseline ("plain approach" of ../shared/data/README.md): pyrosm reads buildings, the full
network, POIs, landuse and natural; geopandas projects to UTM and overlays each geometry family
with a 300 m grid over the bounding box. Each run gets a fresh TMPDIR, so pyrosm's persistent
result cache ($TMPDIR/pyrosm/cache) cannot turn a repeat run into a cache read. Ours: ``ingest.build_tile_shards`` end to end,
including writing the zstd Parquet shards and the manifest.

Second baseline, QuackOSM (``bench/quackosm_baseline.py``): its pbf reader, then DuckDB spatial cuts the
features with the same 300 m grid into tiled GeoParquet. It runs in its own venv
(``bench/_cache/quackosm-venv``, built on first use from the package index) because QuackOSM 0.19 needs
DuckDB 1.5, and its ``spatial`` extension comes from a wheel instead of a run-time download.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SRC = REPO.parent / "shared" / "data" / "osm" / "liechtenstein-2013-08-03.osm.pbf"
CACHE = HERE / "_cache"


def _peak_rss_mb() -> float:
    """Peak RSS of this process plus the largest of its finished children (workers), MB.

    The two peaks need not coincide, so this is an upper bound on the memory in use at once.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def run_baseline(path: str) -> dict:
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import pyrosm
    import shapely

    from geojepa_pipeline.geo.grid import choose_epsg

    t0 = time.perf_counter()
    osm = pyrosm.OSM(path)
    frames = [osm.get_buildings(), osm.get_network(network_type="all"), osm.get_pois(), osm.get_landuse(), osm.get_natural()]
    frames = [f[["id", "geometry"]] for f in frames if f is not None and len(f)]
    gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=4326)
    t_read = time.perf_counter() - t0
    epsg = choose_epsg(gdf.geometry.values)
    gdf = gdf.to_crs(epsg)
    minx, miny, maxx, maxy = gdf.total_bounds
    xs = np.arange(np.floor(minx / 300) * 300, maxx, 300)
    ys = np.arange(np.floor(miny / 300) * 300, maxy, 300)
    gx, gy = np.meshgrid(xs, ys)
    grid = gpd.GeoDataFrame({"cell": np.arange(gx.size)}, geometry=shapely.box(gx.ravel(), gy.ravel(), gx.ravel() + 300, gy.ravel() + 300), crs=epsg)
    families = gdf.geometry.geom_type.str.replace("Multi", "").replace({"LinearRing": "LineString"})
    pieces = []
    for fam in ("Polygon", "LineString", "Point"):
        part = gdf[families == fam]
        if len(part):
            pieces.append(gpd.overlay(part, grid, how="intersection", keep_geom_type=True))
    out = pd.concat(pieces, ignore_index=True)
    total = time.perf_counter() - t0
    return {"wall_s": total, "read_s": t_read, "overlay_s": total - t_read, "n_entities": len(gdf),
            "n_tiles": int(out["cell"].nunique()), "n_pieces": len(out), "grid_cells": len(grid), "peak_rss_mb": _peak_rss_mb()}


def run_ours(path: str, clip: str | None = None, block_tiles: int = 0, trace: str | None = None) -> dict:
    import pyrosm.pbfreader  # noqa: F401  (imported before the clock starts, like the baseline's imports)

    from geojepa_pipeline.geo.clip import ClipArea
    from geojepa_pipeline.stages.osm import build_tile_shards
    from geojepa_pipeline.store import Store
    from memtrace import TreeMemory

    lines: list[tuple[float, str]] = []  # (seconds, build log line), to say in which step memory peaked
    with tempfile.TemporaryDirectory() as tmp, TreeMemory() as mem:
        t0 = time.perf_counter()
        # block_tiles > 0: block by block, blocks of that side; -1: whole file; 0: the options' defaults (by size)
        blocks = {"block_min_mb": 0, "block_tiles": block_tiles} if block_tiles > 0 else {"block_min_mb": -1} if block_tiles < 0 else {}
        result = build_tile_shards("bench", Store(tmp), extract_path=Path(path), source={"uri": path},
                                   clip=ClipArea.parse(clip) if clip else None,
                                   log=lambda m: lines.append((time.perf_counter() - t0, m)), **blocks)
        total = time.perf_counter() - t0
    acc = result.tiled.accounting()
    peak_t = max(mem.trace, key=lambda s: s[1])[0] if mem.trace else 0.0
    during = [m for t, m in lines if t <= peak_t]
    if trace:
        with open(trace, "w") as f:
            f.write("seconds,tree_pss_mb,main_rss_mb,processes,log\n")
            events = sorted([(s[0], s) for s in mem.trace] + [(t, m) for t, m in lines], key=lambda e: e[0])
            for t, e in events:
                f.write(f"{t:.2f},{e[1]},{e[2]},{e[3]},\n" if isinstance(e, tuple) else f"{t:.2f},,,,{e!r}\n")
    return {"wall_s": total, "n_input": acc["n_input"], "n_entities": acc["n_entities_kept"], "data_version": result.dataset.data_version,
            "n_tiles": result.manifest["n_tiles"], "n_pieces": result.manifest["n_pieces"], "epsg": result.tiled.epsg,
            "by_blocks": bool(result.manifest.get("ingestion", {}).get("by_blocks")),
            "phases_s": {k: round(v, 2) for k, v in result.timings_s.items()}, "peak_mb": round(mem.peak_mb),
            "peak_at": f"{peak_t:.0f} s, after: {during[-1][:70] if during else 'start'}", "peak_rss_mb": _peak_rss_mb()}


def _subprocess(which: str, path: Path, clip: str | None = None, block_tiles: int = 0, trace: str | None = None) -> dict:
    # pyrosm keeps a result cache in $TMPDIR/pyrosm/cache: a fresh TMPDIR makes every run cold
    with tempfile.TemporaryDirectory() as tmp:
        extra = ((["--clip", clip] if clip else []) + (["--blocks", str(block_tiles)] if block_tiles else [])
                 + (["--trace", trace] if trace else []))
        proc = subprocess.run([sys.executable, __file__, "--worker", which, str(path)] + extra,
                              capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


QUACKOSM_VENV = CACHE / "quackosm-venv"
QUACKOSM_PINS = ["quackosm==0.19.0", "duckdb==1.5.5", "duckdb-extensions==1.5.5", "duckdb-extension-spatial==1.5.5"]


def quackosm_python() -> Path:
    """The QuackOSM venv's python, built on first use (about a minute)."""
    python = QUACKOSM_VENV / "bin" / "python"
    stamp = QUACKOSM_VENV / ("installed-" + "-".join(QUACKOSM_PINS).replace("==", "_"))
    if not stamp.exists():
        print(f"building {QUACKOSM_VENV} ({', '.join(QUACKOSM_PINS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(QUACKOSM_VENV)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *QUACKOSM_PINS], capture_output=True, text=True)
        if pip.returncode != 0:
            raise SystemExit(f"cannot build the QuackOSM venv ({' '.join(QUACKOSM_PINS)}):\n{pip.stderr[-2000:]}")
        stamp.touch()
    return python


def run_quackosm(path: Path, epsg: int) -> dict:
    """``bench/quackosm_baseline.py`` in the QuackOSM venv, in a fresh scratch dir (no cache reuse)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(quackosm_python()), str(HERE / "quackosm_baseline.py"), str(path), str(epsg), tmp],
                              capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
    if proc.returncode != 0:
        raise SystemExit(f"quackosm failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replicated(src: Path, n: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from replicate import replicate

    if n == 1:
        return src
    out = CACHE / f"{src.name.split('.')[0]}-{n}x{n}.osm.pbf"
    if not out.exists():
        CACHE.mkdir(exist_ok=True)
        t = time.perf_counter()
        replicate(src, out, n)
        print(f"built {out.name} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="ingestion benchmark")
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--n", type=int, default=8, help="N for the N x N replicated extract")
    ap.add_argument("--scaling", default="1,2,4,8", help="comma-separated N values for the scaling table ('' to skip)")
    ap.add_argument("--skip-baseline", action="store_true", help="skip both baselines")
    ap.add_argument("--no-quackosm", action="store_true", help="skip the QuackOSM baseline (it needs its own venv)")
    ap.add_argument("--clip", help="W,S,E,N: also ingest only that area of the same file (geojepa regions add --clip), "
                                   "and compare with the whole file")
    ap.add_argument("--blocks", type=int, default=0, metavar="BLOCK_TILES",
                    help="also ingest the same file block by block (blocks of BLOCK_TILES tiles a side), and compare")
    ap.add_argument("--trace", metavar="CSV", help="write the default run's memory trace (every 0.5 s) and build log lines to CSV")
    ap.add_argument("--worker", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        which, path = args.worker
        print(json.dumps(run_baseline(path) if which == "baseline" else run_ours(path, args.clip, args.blocks, args.trace)))
        return

    big = replicated(args.src, args.n)
    print(f"file: {big.name} ({big.stat().st_size / 2**20:.1f} MiB)", flush=True)
    ours = _subprocess("ours", big, trace=args.trace)
    print(f"ours:     {ours['wall_s']:6.1f} s  peak memory {ours['peak_mb']:6,.0f} MB (at {ours['peak_at']}; peak RSS bound "
          f"{ours['peak_rss_mb']:,.0f} MB)  {'by blocks' if ours['by_blocks'] else 'whole file'}  "
          f"{ours['n_tiles']:,} tiles, {ours['n_pieces']:,} pieces, {ours['n_entities']:,} entities  phases {ours['phases_s']}", flush=True)
    if args.blocks:
        from geojepa_pipeline.stages.osm import TileShardsOptions

        # the default run is already the whole-file one unless blocks are on by default
        whole = ours if TileShardsOptions().block_min_mb < 0 else _subprocess("ours", big, block_tiles=-1)
        blocks = _subprocess("ours", big, block_tiles=args.blocks)
        for label, r in (("whole", whole), (f"blocks {args.blocks}", blocks)):
            print(f"{label + ':':16s} {r['wall_s']:6.1f} s  peak memory {r['peak_mb']:6,.0f} MB (RSS bound {r['peak_rss_mb']:,.0f})  "
                  f"{r['n_tiles']:,} tiles, {r['n_pieces']:,} pieces  phases {r['phases_s']}", flush=True)
        print(f"ratio blocks/whole: wall {blocks['wall_s'] / whole['wall_s']:.2f}, peak memory {blocks['peak_mb'] / whole['peak_mb']:.2f}; "
              f"same data version: {blocks['data_version'] == whole['data_version']}", flush=True)
    if args.clip:
        clipped = _subprocess("ours", big, args.clip)
        print(f"clipped:  {clipped['wall_s']:6.1f} s  peak memory {clipped['peak_mb']:6,.0f} MB  "
              f"{clipped['n_tiles']:,} tiles, {clipped['n_pieces']:,} pieces, {clipped['n_entities']:,} entities  "
              f"phases {clipped['phases_s']}", flush=True)
        print(f"ratio clipped/whole: wall {clipped['wall_s'] / ours['wall_s']:.2f}, peak memory "
              f"{clipped['peak_mb'] / ours['peak_mb']:.2f}, tiles {clipped['n_tiles'] / ours['n_tiles']:.3f}", flush=True)
    if not args.skip_baseline:
        base = _subprocess("baseline", big)
        print(f"baseline: {base['wall_s']:6.1f} s  peak RSS {base['peak_rss_mb']:6.0f} MB  "
              f"{base['n_tiles']:,} tiles, {base['n_pieces']:,} pieces, {base['n_entities']:,} entities  "
              f"(pyrosm read {base['read_s']:.1f} s, overlay {base['overlay_s']:.1f} s)", flush=True)
        print(f"ratio ours/baseline wall time: {ours['wall_s'] / base['wall_s']:.2f}  (target <= 0.50)")
        if not args.no_quackosm:
            quack = run_quackosm(big, ours["epsg"])
            print(f"quackosm: {quack['wall_s']:6.1f} s  peak RSS {quack['peak_rss_mb']:6.0f} MB  "
                  f"{quack['n_tiles']:,} tiles, {quack['n_pieces']:,} pieces, {quack['n_entities']:,} entities  "
                  f"(QuackOSM read {quack['read_s']:.1f} s, DuckDB spatial tiling {quack['tile_s']:.1f} s)", flush=True)
            print(f"ratio ours/quackosm wall time: {ours['wall_s'] / quack['wall_s']:.2f}, peak RSS "
                  f"{ours['peak_rss_mb'] / quack['peak_rss_mb']:.2f}", flush=True)
    if args.scaling:
        print("scaling (ours):  N   input features   wall s   s per 1k features   peak memory MB   how")
        for n in [int(v) for v in args.scaling.split(",") if v]:
            r = ours if n == args.n else _subprocess("ours", replicated(args.src, n))
            print(f"                 {n:<3} {r['n_input']:>14,}   {r['wall_s']:6.2f}   {1000 * r['wall_s'] / r['n_input']:17.4f}   "
                  f"{r['peak_mb']:14,.0f}   {'by blocks' if r['by_blocks'] else 'whole file'}", flush=True)


if __name__ == "__main__":
    main()
