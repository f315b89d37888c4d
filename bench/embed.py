"""tile_embeddings throughput and ``geojepa embed`` latency.

    python bench/embed.py [--home DIR] [--repeats 3] [--index-tiles 1000000] [--queries 20]

1. Throughput, in one process: tiles embedded per second through the real loader (each tile shard read, its
   batches built as the forward asks for them, the model's forward: ``stages.embeddings.shard_batches`` + ``embed_batches``, what
   ``build_tile_embeddings`` runs) against the forward alone on the same batches, built beforehand. Alternated
   ``--repeats`` times; the medians and their ratio (target >= 0.8). Needs a GEOJEPA_HOME with tile_tokens and a GT
   checkpoint: ``--home``, or by default a fresh one with the demo extract (demo:liechtenstein, no imagery, 1 epoch of
   ``tiny``), built first.
2. Latency: a synthetic region of ``--index-tiles`` tiles (random clustered embeddings of the checkpoint's width,
   its kNN index stored as ``build_tile_embeddings`` stores one past 100k tiles) in its own GEOJEPA_HOME, then
   ``geojepa embed --lat --lon --k 5 --json`` at random tiles, each a new process (process start included): by the CLI
   alone (it opens the region and its index itself), then with ``geojepa embed --serve`` running, whose answers must
   equal the CLI's own: p50 and p95 wall time over ``--queries`` queries (target p50 <= 50 ms), the server's RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GEOJEPA = Path(sys.executable).parent / "geojepa"
UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


def _cli(home: Path, *args: str) -> str:
    proc = subprocess.run([str(GEOJEPA), "--home", str(home), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"geojepa {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def demo_home(home: Path) -> None:
    """The demo region through tokens and a 1-epoch GT checkpoint, in ``home``."""
    t = time.perf_counter()
    _cli(home, "regions", "add", "li", "--osm", "demo:liechtenstein", "--imagery", "none", "--replace")
    _cli(home, "materialize", "--region", "li", "--select", UP_TO_TOKENS, "--quiet")
    _cli(home, "materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "1", "--quiet")
    print(f"built the demo region's tokens and a GT checkpoint in {time.perf_counter() - t:.0f} s", flush=True)


def throughput(home: Path, repeats: int) -> dict:
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.stages.embeddings import embed_batches, keep_freed_heap, shard_batches
    from geojepa_pipeline.stages.evaluation import load_checkpoint_model
    from geojepa_pipeline.store import CHECKPOINTS, TILES, TOKENS, Store, aligned_shards

    settings = get_settings(home)
    store = Store(settings.store_root)
    model, _ = load_checkpoint_model(store.require(CHECKPOINTS, "GT"))
    heap = keep_freed_heap()  # as build_tile_embeddings does, for both halves
    regions = [r for r in store.regions(TOKENS)]
    shards = []
    for region in regions:
        tokens = store.require(TOKENS, region)
        tiles = store.dataset(TILES, region, tokens.manifest["inputs"]["tile_shards"])
        shards += aligned_shards((tiles, "tiles"), (tokens, "tokens"))
    prebuilt = []  # every batch of every shard, built beforehand and kept
    for tiles_path, tokens_path in shards:
        t, batches = shard_batches(tiles_path, tokens_path, None, 0, False)
        prebuilt.append((t, list(batches)))
    n_tiles = sum(t.num_rows for t, _ in prebuilt)
    n_tokens = sum(int(np.asarray(t.column("n_entities")).sum()) for t, _ in prebuilt)
    real, alone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for tiles_path, tokens_path in shards:  # the loader and the forward, shard by shard
            t, batches = shard_batches(tiles_path, tokens_path, None, 0, False)
            embed_batches(model, batches, t.num_rows)
        real.append(n_tiles / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for t, batches in prebuilt:  # the forward alone
            embed_batches(model, batches, t.num_rows)
        alone.append(n_tiles / (time.perf_counter() - t0))
    return {"regions": regions, "n_tiles": n_tiles, "n_tokens": n_tokens, "real_tiles_per_s": statistics.median(real),
            "forward_tiles_per_s": statistics.median(alone), "ratio": statistics.median(real) / statistics.median(alone),
            "dim": 2 * model.cfg.dim, "heap_kept": heap}


def token_decode(home: Path, repeats: int = 5) -> dict:
    """Best-of-``repeats`` ms to read the first token shard's ``tag_token`` column in its two encodings: float16 rows
    (``fixed_size_binary``, tokens schema 2) and ``fixed_size_list<float16>`` (schema 1), the same values rewritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geojepa_pipeline.columns import float16_rows, matrix_to_numpy, numpy_to_fixed_list
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.store import TOKENS, Store

    store = Store(get_settings(home).store_root)
    tokens = store.require(TOKENS, store.regions(TOKENS)[0])
    tag = matrix_to_numpy(pq.read_table(tokens.shards("tokens")[0], columns=["tag_token"]).column("tag_token"), np.float16)
    out = {"n": len(tag), "width": tag.shape[1]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, col in (("float16_rows", float16_rows(tag)), ("fixed_size_list", numpy_to_fixed_list(tag, pa.float16()))):
            path = Path(tmp) / f"{name}.parquet"
            pq.write_table(pa.table({"tag_token": col}), path, compression="zstd")
            walls = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                matrix_to_numpy(pq.read_table(path).column("tag_token"))
                walls.append(time.perf_counter() - t0)
            out[name] = (1000 * min(walls), path.stat().st_size / 2**20)
    return out


def synthetic_region(home: Path, n_tiles: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """A ``tile_embeddings`` dataset of ``n_tiles`` tiles (a square block of the UTM 32N grid near Vaduz) in ``home``'s
    store, with its kNN index; returns the tiles' centre (lon, lat) and the zone's EPSG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geojepa_pipeline.columns import numpy_to_fixed_list
    from geojepa_pipeline.evaluate.index import CosineIndex
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.stages.embeddings import _geo_metadata, tile_squares
    from geojepa_pipeline.store import EMBEDDINGS, TILE_EMBEDDINGS_FILE, TILE_INDEX_FILE, Store

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles)))
    epsg, size = 32632, 300.0
    idx = np.arange(n_tiles)
    tx, ty = 1500 + idx % side, 15000 + idx // side
    centres = rng.normal(size=(64, dim)).astype(np.float32) * 3
    emb = (centres[rng.integers(0, 64, n_tiles)] + rng.normal(size=(n_tiles, dim)).astype(np.float32))
    lonlat, utm = tile_squares(tx, ty, size, epsg)
    import shapely

    bbox = [float(v) for v in shapely.total_bounds(shapely.from_wkb(lonlat))]
    const = lambda v: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_tiles, np.int8)), pa.array([v]))  # noqa: E731
    table = pa.table({"tile_id": pa.array([f"syn_{x}_{y}" for x, y in zip(tx, ty)]), "tile_x": pa.array(tx, pa.int32()),
                      "tile_y": pa.array(ty, pa.int32()), "geometry": pa.array(lonlat, pa.binary()), "geometry_utm": pa.array(utm, pa.binary()),
                      "embedding": numpy_to_fixed_list(emb, pa.float32()), "model": const("geojepa-GT"),
                      "model_version": const("geojepa-GT:synthetic"), "tokens_version": const("synthetic")})
    store = Store(get_settings(home).store_root)
    with store.writing(EMBEDDINGS, "syn.GT") as staging:
        table = table.replace_schema_metadata({b"geo": _geo_metadata(epsg, bbox)})
        pq.write_table(table, staging.file(TILE_EMBEDDINGS_FILE), compression="zstd", row_group_size=65536)
        t_index = time.perf_counter()
        CosineIndex(emb).save(staging.file(TILE_INDEX_FILE))
        t_index = time.perf_counter() - t_index
        staging.manifest = {"schema_version": 1, "region": "syn", "variant": "GT", "model_version": "geojepa-GT:synthetic",
                            "n_tiles": n_tiles, "dim": dim, "dtype": "float32", "epsg": epsg, "tile_size_m": size,
                            "bbox_lonlat": bbox, "inputs": {"checkpoint": "synthetic", "tile_tokens": "synthetic",
                                                           "tile_shards": "synthetic", "tile_images": None}}
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform((tx + 0.5) * size, (ty + 0.5) * size)
    print(f"synthetic region: {n_tiles:,} tiles x {dim} float32 in {time.perf_counter() - t:.0f} s (index {t_index:.0f} s), "
          f"{(staging.dataset.path / TILE_EMBEDDINGS_FILE).stat().st_size / 2**20:.0f} MiB GeoParquet, "
          f"{(staging.dataset.path / TILE_INDEX_FILE).stat().st_size / 2**20:.0f} MiB index", flush=True)
    return np.asarray(lon), np.asarray(lat), epsg


def _query_walls(home: Path, lon: np.ndarray, lat: np.ndarray, picks: np.ndarray) -> tuple[list[float], list[str]]:
    walls, outs = [], []
    for i in picks:
        t0 = time.perf_counter()
        out = _cli(home, "embed", "--lat", repr(float(lat[i])), "--lon", repr(float(lon[i])), "--k", "5", "--json")
        walls.append(time.perf_counter() - t0)
        assert json.loads(out)["region"] == "syn" and len(json.loads(out)["neighbours"]) == 5
        outs.append(out)
    return walls, outs


def latency(home: Path, lon: np.ndarray, lat: np.ndarray, queries: int) -> dict:
    """``geojepa embed --lat --lon --k 5 --json`` wall times, each a new process: alone (the CLI opens the region and its
    index itself), then with ``geojepa embed --serve`` running (the same command asks it); the answers must agree."""
    import os
    import signal

    rng = np.random.default_rng(1)
    picks = rng.choice(len(lon), queries, replace=False)
    alone, outs_alone = _query_walls(home, lon, lat, picks[: max(3, queries // 4)])  # slow: a quarter of the queries
    t0 = time.perf_counter()
    server = subprocess.Popen([str(GEOJEPA), "--home", str(home), "embed", "--serve"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        line = server.stdout.readline()  # "opened <region> ...", then "serving place queries ..." once everything is held
        while line and "serving" not in line:
            line = server.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"geojepa embed --serve did not start (exit {server.poll()})")
        ready_s = time.perf_counter() - t0
        served, outs_served = _query_walls(home, lon, lat, picks)
        rss_mb = _rss_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert outs_served[: len(outs_alone)] == outs_alone, "the server's answers differ from the CLI's own"
    t0 = time.perf_counter()
    _cli(home, "--help")
    start = time.perf_counter() - t0
    return {"alone_p50_ms": 1000 * statistics.median(alone), "alone_n": len(alone),
            "p50_ms": 1000 * statistics.median(served), "p95_ms": 1000 * float(np.percentile(served, 95)),
            "min_ms": 1000 * min(served), "server_ready_s": ready_s, "server_rss_mb": rss_mb, "cli_help_ms": 1000 * start}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description="tile_embeddings throughput and geojepa embed latency")
    ap.add_argument("--home", type=Path, help="a GEOJEPA_HOME with tile_tokens and a GT checkpoint (default: build one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index-tiles", type=int, default=1_000_000, help="tiles of the synthetic region for the latency part (0: skip)")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home
        if home is None:
            home = Path(tmp) / "home"
            demo_home(home)
        r = throughput(home, args.repeats)
        print(f"throughput on {', '.join(r['regions'])}: {r['n_tiles']:,} tiles, {r['n_tokens']:,} tokens, embedding width {r['dim']}"
              f"{'' if r['heap_kept'] else ' (no glibc: freed memory is not kept)'}")
        print(f"  real loader + forward  {r['real_tiles_per_s']:10,.0f} tiles/s")
        print(f"  forward alone          {r['forward_tiles_per_s']:10,.0f} tiles/s")
        print(f"  ratio                  {r['ratio']:10.3f}   (target >= 0.8)", flush=True)
        d = token_decode(home)
        print(f"tag tokens of one shard ({d['n']:,} x {d['width']} float16) read and decoded, best of 5:")
        for name in ("float16_rows", "fixed_size_list"):
            print(f"  {name:<16} {d[name][0]:7.1f} ms  {d[name][1]:6.2f} MiB")
        if args.index_tiles:
            lat_home = Path(tmp) / "latency-home"
            lon, lat, _ = synthetic_region(lat_home, args.index_tiles, r["dim"])
            q = latency(lat_home, lon, lat, args.queries)
            print(f"geojepa embed --lat/--lon --k 5 --json over {args.index_tiles:,} tiles, each query a new process:")
            print(f"  CLI alone (opens the region itself): p50 {q['alone_p50_ms']:.0f} ms over {q['alone_n']} queries")
            print(f"  with geojepa embed --serve running:  p50 {q['p50_ms']:.1f} ms, p95 {q['p95_ms']:.1f} ms, min {q['min_ms']:.1f} ms "
                  f"over {args.queries} queries (target p50 <= 50 ms); same answers as the CLI alone")
            print(f"  server ready in {q['server_ready_s']:.1f} s, {q['server_rss_mb']:,.0f} MB RSS; geojepa --help {q['cli_help_ms']:.0f} ms")


if __name__ == "__main__":
    main()
