"""Aerial imagery without Dagster: ``naip_scenes`` (get the scenes) and ``tile_images`` (chip them).

Scene sources, by the region's ``imagery`` setting:
- ``synthetic``: NAIP-like COGs rendered from the region's tile shards, one per block of
  ``block_tiles`` x ``block_tiles`` tiles that holds any tile (``geo/synthetic.py``);
- ``stac``: a STAC search for NAIP over the region's tiles, newest acquisition per area (``stac.py``);
- a glob of local GeoTIFF/COG files: validated and checksummed, read where they are;
- ``none``: no scenes; every tile is kept with coverage 0.

``scenes/<region>/<data_version>/`` holds ``scenes.json`` (ids, checksums, CRS, bounds,
dates: the data version derives from it) and the scene files that the store owns
(synthetic, downloaded). ``images/<region>/<data_version>/images-NNNNN.parquet`` lines up
1:1 with the tile shards: same shard index, same tile order.
"""

from __future__ import annotations

import glob as globlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from ..errors import GeojepaError
from ..geo.parallel import default_workers, fork_worker_init
from ..geo.raster import BANDS, CHIP_PX, SceneChipper, SceneInfo, inspect_scene
from ..progress import Progress
from ..regions import Region
from ..store import IMAGES, SCENES, SCENES_FILE, TILES, Dataset, Store, aligned_shards, sha256_file

SCENES_SCHEMA_VERSION = 1
IMAGES_SCHEMA_VERSION = 1
IMAGE_ROW_GROUP = 256  # chips per Parquet row group (~51 MB uncompressed)
DEFAULT_BLOCK_TILES = 4  # synthetic scenes: 4 x 4 tiles = 1.2 km, 2000 px at 0.6 m

Log = Callable[[str], None]

IMAGES_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("coverage", pa.float32()),  # fraction of chip pixels with data in every band
    ("has_image", pa.bool_()),  # coverage > 0; else ``image`` is null and the modality is missing
    ("has_nir", pa.bool_()),  # band 4 came from a NIR band (False for RGB-only scenes: NIR is 0)
    ("scene_ids", pa.list_(pa.string())),  # scenes that filled pixels, newest first
    ("image", pa.binary()),  # CHIP_PX * CHIP_PX * 4 uint8, row-major (H, W, C), C = R G B NIR, row 0 north
])


def decode_chip(image_bytes: bytes) -> np.ndarray:
    """(CHIP_PX, CHIP_PX, 4) uint8 view of one ``image`` cell."""
    return np.frombuffer(image_bytes, np.uint8).reshape(CHIP_PX, CHIP_PX, len(BANDS))


# ---- shared helpers -----------------------------------------------------------------------

def _read_tiles(path: Path, columns=("tile_id", "tile_x", "tile_y", "x_min_m", "y_min_m", "tile_size_m")) -> pa.Table:
    """Columns of one ``tiles`` shard."""
    return pq.read_table(path, columns=list(columns))


def tiles_bbox_lonlat(ds: Dataset) -> tuple[float, float, float, float]:
    """(west, south, east, north) of the region's tiles, from tile centres padded by half a tile."""
    from pyproj import Transformer

    xs0, ys0, xs1, ys1 = [], [], [], []
    for path in ds.shards("tiles"):
        t = _read_tiles(path)
        x, y, s = (t.column(c).to_numpy() for c in ("x_min_m", "y_min_m", "tile_size_m"))
        xs0.append(x.min()); ys0.append(y.min()); xs1.append((x + s).max()); ys1.append((y + s).max())
    if not xs0:
        raise GeojepaError(f"tile_shards of {ds.region} hold no tiles; nothing to get imagery for")
    to_lonlat = Transformer.from_crs(ds.manifest["epsg"], 4326, always_xy=True)
    return tuple(float(v) for v in to_lonlat.transform_bounds(min(xs0), min(ys0), max(xs1), max(ys1), densify_pts=21))


# ---- naip_scenes --------------------------------------------------------------------------

@dataclass
class ScenesResult:
    dataset: Dataset
    scenes: list[SceneInfo]
    source: str
    warnings: list[str] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)


def _synthetic_scenes(tiles: Dataset, staging: Path, seed: int, res_m: float, block_tiles: int, log: Log | None) -> list[SceneInfo]:
    """Render one COG per block of tiles that holds any tile, from the tiles' own entity pieces."""
    from ..geo.synthetic import classify

    epsg = int(tiles.manifest["epsg"])
    size = float(tiles.manifest["tile_size_m"])
    per_block: dict[tuple[int, int], list] = {}
    for tiles_path, entities_path in aligned_shards((tiles, "tiles"), (tiles, "entities")):
        t = _read_tiles(tiles_path)
        ents = pq.read_table(entities_path, columns=["tile_id", "osm_id", "tags", "geometry"])
        classes, widths = classify(ents.column("tags"), ents.column("osm_id").to_numpy())
        keep = np.flatnonzero(classes >= 0)
        if not len(keep):
            continue
        # tile origin of each piece: pieces are stored in tile-local metres
        tile_row = {tid: i for i, tid in enumerate(t.column("tile_id").to_pylist())}
        rows = np.array([tile_row[tid] for tid in ents.column("tile_id").take(pa.array(keep)).to_pylist()], np.int64)
        x0, y0 = t.column("x_min_m").to_numpy()[rows], t.column("y_min_m").to_numpy()[rows]
        geoms = shapely.from_wkb(ents.column("geometry").take(pa.array(keep)).to_numpy(zero_copy_only=False))
        coords, index = shapely.get_coordinates(geoms, return_index=True)
        geoms = shapely.set_coordinates(geoms, coords + np.column_stack([x0, y0])[index])
        bx = t.column("tile_x").to_numpy()[rows] // block_tiles
        by = t.column("tile_y").to_numpy()[rows] // block_tiles
        for key in set(zip(bx.tolist(), by.tolist())):
            m = (bx == key[0]) & (by == key[1])
            per_block.setdefault(key, []).append((geoms[m], classes[keep][m], widths[keep][m]))
        # blocks with tiles but no classed entity still get a (bare ground) scene
        for key in set(zip((t.column("tile_x").to_numpy() // block_tiles).tolist(), (t.column("tile_y").to_numpy() // block_tiles).tolist())):
            per_block.setdefault(key, [])
    global _SYNTH
    job = dict(per_block=per_block, staging=staging, seed=seed, res_m=res_m, block_tiles=block_tiles, size=size, epsg=epsg)
    keys = sorted(per_block)
    scenes = []
    progress = Progress(f"render synthetic scenes ({len(keys)} blocks of {block_tiles}x{block_tiles} tiles)", total=len(keys), log=log)
    workers = default_workers()
    if workers > 1 and len(keys) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _SYNTH = job  # forked workers inherit the geometries instead of receiving them pickled
        try:
            with multiprocessing.get_context("fork").Pool(workers, initializer=fork_worker_init) as pool:
                for done, info in enumerate(pool.imap(_render_synthetic_block, keys), start=1):
                    scenes.append(info)
                    progress.update(done)
                pool.close()
                pool.join()
        finally:
            _SYNTH = None
    else:
        for done, key in enumerate(keys, start=1):
            scenes.append(_render_synthetic_block(key, job))
            progress.update(done)
    progress.finish()
    return scenes


_SYNTH: dict | None = None  # the synthetic render job, set before forking workers


def _render_synthetic_block(key: tuple[int, int], job: dict | None = None) -> SceneInfo:
    """Render and write one synthetic scene; returns its SceneInfo (runs in a worker process)."""
    from ..geo.synthetic import SYNTHETIC_ACQUIRED, SyntheticBlock, render_block, write_cog

    job = job or _SYNTH
    bx, by = key
    parts = job["per_block"][key]
    geoms = np.concatenate([p[0] for p in parts]) if parts else np.array([], object)
    classes = np.concatenate([p[1] for p in parts]) if parts else np.array([], np.int16)
    widths = np.concatenate([p[2] for p in parts]) if parts else np.array([], np.float32)
    n, size = job["block_tiles"], job["size"]
    block = SyntheticBlock(bx, by, bx * n * size, by * n * size, n * size)
    image = render_block(block, geoms, classes, widths, seed=job["seed"], res_m=job["res_m"])
    path = job["staging"] / f"synthetic-{bx}_{by}.tif"
    write_cog(path, image, job["epsg"], block.left_m, block.bottom_m + block.size_m, job["res_m"], SYNTHETIC_ACQUIRED)
    return inspect_scene(path, sha256_file(path), scene_id=f"synthetic-{job['epsg']}-{bx}_{by}")


def _local_scenes(pattern: str, log: Log | None) -> list[SceneInfo]:
    paths = sorted(Path(p) for p in globlib.glob(pattern) if Path(p).is_file())
    if not paths:
        raise GeojepaError(f"imagery glob {pattern!r} matches no files; fix the glob with `geojepa regions add … --imagery 'DIR/*.tif' --replace`")
    scenes = []
    ids = set()
    for path in paths:
        st = path.stat()
        info = inspect_scene(path, sha256_file(path))
        if info.scene_id in ids:
            info = SceneInfo(**{**info.__dict__, "scene_id": f"{info.scene_id}-{info.sha256[:8]}"})
        ids.add(info.scene_id)
        info.extra.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        scenes.append(info)
        if log:
            log(f"scene {info.scene_id}: {info.crs}, {info.count} bands {info.dtype}, {info.res[0]:.2f} m, acquired {info.acquired or 'unknown'}")
    return scenes


def _stac_scenes(bbox: tuple, staging: Path, endpoint: str, year: int | None, log: Log | None) -> list[SceneInfo]:
    from .stac import download_asset, search_naip

    found = search_naip(endpoint, bbox, year=year, log=log)
    scenes = []
    for item in found:
        name = f"{item.item_id}.tif"
        sha = download_asset(item.href, staging / name, log=log)
        info = inspect_scene(staging / name, sha, scene_id=item.item_id, acquired=item.acquired)
        info.extra.update(stac_endpoint=endpoint, href=item.href.split("?")[0])  # no signature tokens
        scenes.append(info)
    return scenes


def _coverage_warning(scenes: list[SceneInfo], bbox: tuple, source: str, region: str) -> str | None:
    area = shapely.box(*bbox)
    if any(shapely.box(*s.bounds_lonlat).intersects(area) for s in scenes):
        return None
    what = "no scenes" if not scenes else f"{len(scenes)} scene(s), none of them over the region's tiles"
    return f"imagery {source!r} of region {region!r} has {what}: every tile of tile_images will have coverage 0"


@dataclass
class NaipScenesOptions:
    """Where naip_scenes gets its scenes (``build_naip_scenes``; the asset's config)."""

    stac_endpoint: str = ""  # empty: $GEOJEPA_STAC_URL, else the Planetary Computer STAC API
    stac_year: int = 0  # 0: any year (the newest acquisition per area wins)
    synthetic_seed: int = 0
    synthetic_res_m: float = 0.6  # metres per pixel of the rendered scenes (the chips are 1.34 m either way)
    synthetic_block_tiles: int = DEFAULT_BLOCK_TILES


@dataclass
class TileImagesOptions:
    """How tile_images chips (``build_tile_images``; the asset's config exposes ``workers``)."""

    workers: int = 0  # chipping threads; 0 = one per core, at most 2 (the output does not depend on it)
    batch_tiles: int = 512  # tiles chipped per batch


def build_naip_scenes(region: Region, store: Store, log: Log | None = None, **options) -> ScenesResult:
    """Get the region's scenes into an immutable ``scenes/<region>/<data_version>``. ``options``: fields of
    ``NaipScenesOptions``."""
    from .stac import PLANETARY_COMPUTER_STAC

    opts = NaipScenesOptions(**options)
    stac_endpoint, stac_year = opts.stac_endpoint or None, opts.stac_year or None
    seed, res_m, block_tiles = opts.synthetic_seed, opts.synthetic_res_m, opts.synthetic_block_tiles

    source = region.imagery
    tiles = store.require(TILES, region.name)
    bbox = tiles_bbox_lonlat(tiles)
    t0 = time.perf_counter()
    with store.writing(SCENES, region.name) as staging:
        if source == "synthetic":
            scenes = _synthetic_scenes(tiles, staging.path, seed, res_m, block_tiles, log)
            detail = {"seed": seed, "res_m": res_m, "block_tiles": block_tiles, "tile_shards": tiles.data_version}
        elif source == "stac":
            endpoint = stac_endpoint or os.environ.get("GEOJEPA_STAC_URL") or PLANETARY_COMPUTER_STAC
            scenes = _stac_scenes(bbox, staging.path, endpoint, stac_year, log)
            detail = {"stac_endpoint": endpoint, "year": stac_year}
        elif source == "none":
            scenes, detail = [], {}
        else:
            scenes, detail = _local_scenes(source, log), {"glob": source}
        # what the data version derives from: ids, checksums and the facts that decide chipping
        identity = [{k: v for k, v in s.to_dict().items() if k not in ("path", "extra")} for s in scenes]
        staging.file(SCENES_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
        stored = []
        for s in scenes:  # files the store owns are named relative to the dataset directory
            d = s.to_dict()
            if Path(s.path).parent == staging.path:
                d["path"] = Path(s.path).name
            stored.append(d)
        staging.manifest = {
            "schema_version": SCENES_SCHEMA_VERSION, "source": source, "bbox_lonlat": list(bbox),
            "scenes": stored, "n_scenes": len(scenes), **detail,
        }
    dataset = staging.dataset
    warnings = [w for w in [_coverage_warning(scenes, bbox, source, region.name)] if w]
    for w in warnings:
        if log:
            log(f"WARNING: {w}")
    return ScenesResult(dataset, load_scenes(dataset), source, warnings, {"scenes_s": time.perf_counter() - t0})


def load_scenes(ds: Dataset) -> list[SceneInfo]:
    """The scenes of a committed ``naip_scenes`` dataset, with absolute paths."""
    out = []
    for d in ds.manifest["scenes"]:
        p = Path(d["path"])
        out.append(SceneInfo.from_dict({**d, "path": str(p if p.is_absolute() else ds.member(str(p)))}))
    return out


def _check_unchanged(scenes: list[SceneInfo]) -> None:
    for s in scenes:
        if "mtime_ns" not in s.extra:
            continue
        try:
            st = os.stat(s.path)
        except FileNotFoundError:
            raise GeojepaError(f"scene {s.path} is gone since naip_scenes was materialized; restore it or re-materialize naip_scenes") from None
        if st.st_size != s.extra["bytes"] or st.st_mtime_ns != s.extra["mtime_ns"]:
            raise GeojepaError(f"scene {s.path} changed since naip_scenes was materialized; re-materialize naip_scenes")


# ---- tile_images --------------------------------------------------------------------------

@dataclass
class ImagesResult:
    dataset: Dataset
    n_tiles: int
    n_with_image: int
    coverage_mean: float
    coverage_hist: dict
    scene_use: dict
    warnings: list[str]
    timings_s: dict


def _chip_rows(scenes: list[SceneInfo], epsg: int, x0: np.ndarray, y0: np.ndarray, size: np.ndarray) -> list:
    with SceneChipper(scenes, epsg) as chipper:
        return [chipper.chip(float(x), float(y), float(s)) for x, y, s in zip(x0, y0, size)]


def chip_tiles(scenes: list[SceneInfo], epsg: int, x0: np.ndarray, y0: np.ndarray, size: np.ndarray, workers: int = 2) -> list:
    """Chips of the tiles with lower-left corners (x0, y0) and sizes in metres, in order.

    ``workers`` threads each hold their own dataset handles; GDAL reads and warps outside
    the GIL, so two threads use two cores.
    """
    n = len(x0)
    if workers <= 1 or n < 8:
        return _chip_rows(scenes, epsg, x0, y0, size)
    bounds = np.linspace(0, n, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda i: _chip_rows(scenes, epsg, x0[bounds[i]:bounds[i + 1]], y0[bounds[i]:bounds[i + 1]], size[bounds[i]:bounds[i + 1]]), range(workers))
        return [c for part in parts for c in part]


def build_tile_images(region: str, store: Store, log: Log | None = None, **options) -> ImagesResult:
    """Chip every tile of the current tile shards from the current scenes into ``images/<region>/<data_version>``.
    ``options``: fields of ``TileImagesOptions``."""
    opts = TileImagesOptions(**options)
    workers, batch_tiles = opts.workers, opts.batch_tiles
    tiles = store.require(TILES, region)
    scenes_ds = store.require(SCENES, region)
    scenes = load_scenes(scenes_ds)
    _check_unchanged(scenes)
    epsg = int(tiles.manifest["epsg"])
    workers = workers or default_workers()
    t0 = time.perf_counter()
    n_tiles = n_with = 0
    cov_sum = 0.0
    hist = np.zeros(5, np.int64)  # coverage 0, (0, .25], (.25, .5], (.5, 1), 1
    scene_use: dict[str, int] = {}
    shards = []
    progress = Progress(f"tile_images[{region}]", total=tiles.manifest["n_tiles"], log=log)
    meta = {b"geojepa:chip": json.dumps({"px": CHIP_PX, "bands": list(BANDS), "layout": "HWC", "dtype": "uint8"}).encode()}
    with store.writing(IMAGES, region) as staging:
        for shard, tiles_path in zip(tiles.shard_entries, tiles.shards("tiles")):
            t = _read_tiles(tiles_path)
            path = staging.shard("images", shard["index"])
            n_shard_with = 0
            with pq.ParquetWriter(path, IMAGES_SCHEMA.with_metadata(meta), compression="zstd") as writer:
                for start in range(0, t.num_rows, batch_tiles):
                    part = t.slice(start, batch_tiles)
                    chips = chip_tiles(scenes, epsg, part.column("x_min_m").to_numpy(), part.column("y_min_m").to_numpy(),
                                       part.column("tile_size_m").to_numpy(), workers=workers)
                    cov = np.array([c.coverage for c in chips], np.float32)
                    has = cov > 0
                    batch = pa.table({
                        "tile_id": part.column("tile_id"),
                        "coverage": cov,
                        "has_image": has,
                        "has_nir": [c.has_nir for c in chips],
                        "scene_ids": [c.scene_ids for c in chips],
                        "image": [c.image.tobytes() if h else None for c, h in zip(chips, has)],
                    }, schema=IMAGES_SCHEMA)
                    writer.write_table(batch, row_group_size=IMAGE_ROW_GROUP)
                    for c in chips:
                        for sid in c.scene_ids:
                            scene_use[sid] = scene_use.get(sid, 0) + 1
                    n_tiles += len(chips)
                    n_shard_with += int(has.sum())
                    cov_sum += float(cov.sum())
                    hist += np.array([(cov == 0).sum(), ((cov > 0) & (cov <= .25)).sum(), ((cov > .25) & (cov <= .5)).sum(),
                                      ((cov > .5) & (cov < 1)).sum(), (cov == 1).sum()])
                    progress.update(n_tiles)
            n_with += n_shard_with
            shards.append(staging.shard_entry(shard["index"], {"images": path, "tiles": tiles_path},
                                              n_tiles=t.num_rows, n_with_image=n_shard_with,
                                              first_tile=shard.get("first_tile"), last_tile=shard.get("last_tile")))
        progress.finish()
        if n_tiles and n_with == 0 and scenes and scenes_ds.manifest.get("source") not in ("synthetic", "none"):
            previous = store.current_version(IMAGES, region)
            raise GeojepaError(  # chips of nothing would replace the good ones: keep the current version
                f"no tile of region {region!r} is covered by its {len(scenes)} scene(s) from {scenes_ds.manifest.get('source')!r} "
                f"(naip_scenes {scenes_ds.data_version}): every chip would be empty, so tile_images keeps "
                f"{'its current version ' + previous if previous else 'no version'}; check that the rasters lie over the region "
                f"(bbox {', '.join(f'{v:.4f}' for v in scenes_ds.manifest['bbox_lonlat'])} lon/lat) and materialize naip_scenes again")
        staging.manifest = {
            "schema_version": IMAGES_SCHEMA_VERSION, "chip_px": CHIP_PX, "bands": list(BANDS), "layout": "HWC",
            "epsg": epsg, "n_tiles": n_tiles, "n_with_image": n_with, "shards": shards,
            "inputs": {"tile_shards": tiles.data_version, "naip_scenes": scenes_ds.data_version},
        }
    dataset = staging.dataset
    warnings = []
    labels = ["0", "(0, 0.25]", "(0.25, 0.5]", "(0.5, 1)", "1"]
    return ImagesResult(
        dataset, n_tiles, n_with, cov_sum / max(n_tiles, 1), dict(zip(labels, hist.tolist())), scene_use, warnings,
        {"chip_s": time.perf_counter() - t0},
    )


def preview_png(tiles: Dataset, images: Dataset, n: int = 3) -> bytes:
    """A few chips (those with image and the most entities) beside their rendered OSM entities."""
    import pyarrow.compute as pc

    from ..geo.render import chip_preview_png
    from ..geo.synthetic import class_preview_rgb, classify, paint_geometries, rasterize_classes

    candidates = []
    for tiles_path, entities_path, images_path in aligned_shards((tiles, "tiles"), (tiles, "entities"), (images, "images")):
        t = _read_tiles(tiles_path, columns=("tile_id", "n_entities", "tile_size_m"))
        has = pq.read_table(images_path, columns=["has_image"]).column("has_image").to_numpy(zero_copy_only=False)
        for tid, ne, s, h in zip(t.column("tile_id").to_pylist(), t.column("n_entities").to_pylist(), t.column("tile_size_m").to_pylist(), has):
            if h:
                candidates.append((ne, tid, entities_path, images_path, s))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    rows = []
    for ne, tid, entities_path, images_path, size in candidates[:n]:
        img = pq.read_table(images_path, columns=["tile_id", "image", "coverage"], filters=[("tile_id", "=", tid)])
        ents = pq.read_table(entities_path, columns=["tile_id", "osm_id", "tags", "geometry"], filters=[("tile_id", "=", tid)])
        classes, widths = classify(ents.column("tags"), ents.column("osm_id").to_numpy())
        geoms = shapely.from_wkb(ents.column("geometry").to_numpy(zero_copy_only=False))
        shapes, values = paint_geometries(geoms, classes, widths)
        res = size / CHIP_PX
        osm_map = class_preview_rgb(rasterize_classes(shapes, values, 0.0, size, CHIP_PX, CHIP_PX, res))
        cov = float(pc.min(img.column("coverage")).as_py())
        rows.append((decode_chip(img.column("image")[0].as_py()), osm_map, f"{tid}  {ne} entities  coverage {cov:.2f}"))
    return chip_preview_png(rows)


# ---- chips under a task's masked input (evaluation) ----------------------------------------

CHIP_CACHE_GROUPS = 4  # decoded row groups of chips kept (~51 MB each)
RENDER_CACHE_BLOCKS = 64  # re-rendered synthetic blocks kept (16 chips, ~3 MB each)


class StoredChips:
    """A region's chips as ``tile_images`` stored them: what real imagery (files, STAC) shows whatever is masked.

    ``chips(rows, inp)`` takes region rows (tiles in shard order); one Parquet row group (256 chips) is
    decoded at a time and kept, so consecutive rows cost one read."""

    def __init__(self, images: Dataset, kind: str):
        self.kind, self.images = kind, images
        self.files = [pq.ParquetFile(path) for path in images.shards("images")]
        rows = [0]
        self.groups = []  # (shard, row group) in region row order
        for i, f in enumerate(self.files):
            for g in range(f.num_row_groups):
                self.groups.append((i, g))
                rows.append(rows[-1] + f.metadata.row_group(g).num_rows)
        self.group_start = np.asarray(rows, np.int64)
        self._cached: dict = {}  # the last few row groups read (oldest first)

    @property
    def n_tiles(self) -> int:
        return int(self.group_start[-1])

    def changed(self, inp) -> np.ndarray:
        return np.zeros(self.n_tiles, bool)

    def _group(self, g: int):
        if g not in self._cached:
            shard, group = self.groups[g]
            t = self.files[shard].read_row_group(group, columns=["has_image", "image"])
            self._cached[g] = (g, t.column("has_image").to_pylist(), t.column("image"))
            while len(self._cached) > CHIP_CACHE_GROUPS:
                self._cached.pop(next(iter(self._cached)))
        return self._cached[g]

    def chips(self, rows: np.ndarray, inp=None) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, 224, 224, 4) uint8, has_image (n,) bool) of region rows ``rows``."""
        images = np.zeros((len(rows), CHIP_PX, CHIP_PX, len(BANDS)), np.uint8)
        has = np.zeros(len(rows), bool)
        for i, row in enumerate(np.asarray(rows, np.int64).tolist()):
            g = int(np.searchsorted(self.group_start, row, side="right") - 1)
            _, flags, blobs = self._group(g)
            j = row - int(self.group_start[g])
            if flags[j]:
                images[i], has[i] = decode_chip(blobs[j].as_py()), True
        return images, has


class SyntheticChips:
    """Chips of a synthetic-imagery region, re-rendered from a task's masked entities.

    Synthetic imagery is drawn from the same OSM entities the task masks, so under the masked
    protocol a block of ``block_tiles`` x ``block_tiles`` tiles whose painted content changed (a
    removed piece that was painted, or a kept piece whose class or width changed with its tags) is
    rendered again, exactly as ``naip_scenes`` rendered it (same order, seed, COG and overviews),
    and its tiles are chipped as ``tile_images`` chips them, with the block's scene swapped for the
    masked one. Unchanged blocks keep their stored chips: with nothing masked a re-rendered chip is
    the stored one, byte for byte.
    """

    def __init__(self, store: Store, region: str, tiles: Dataset, images: Dataset, pieces, stored: StoredChips):
        from ..geo.synthetic import classify

        self.kind, self.stored = "synthetic", stored
        scenes_ds = store.dataset(SCENES, region, images.manifest["inputs"]["naip_scenes"])
        m = scenes_ds.manifest
        self.seed, self.res_m, self.block_tiles = int(m["seed"]), float(m["res_m"]), int(m["block_tiles"])
        self.scenes = load_scenes(scenes_ds)
        self.epsg, self.size = int(tiles.manifest["epsg"]), float(tiles.manifest["tile_size_m"])
        t = pa.concat_tables([_read_tiles(path) for path in tiles.shards("tiles")])
        self.x0, self.y0 = t.column("x_min_m").to_numpy(), t.column("y_min_m").to_numpy()
        bx, by = t.column("tile_x").to_numpy() // self.block_tiles, t.column("tile_y").to_numpy() // self.block_tiles
        self.blocks, self.tile_block = np.unique(np.column_stack([bx, by]), axis=0, return_inverse=True)
        self.tile_block = self.tile_block.reshape(-1)
        wkb = pa.concat_arrays([c for path in tiles.shards("entities")
                                for c in pq.read_table(path, columns=["geometry"]).column("geometry").chunks])
        self.wkb = wkb.to_numpy(zero_copy_only=False)
        self.pieces = pieces
        self.classes, self.widths = classify(pieces.tags, pieces.osm_id)
        dims = shapely.get_dimensions(shapely.from_wkb(self.wkb))
        self.paintable = dims >= 1  # points are never painted
        self._task, self._rendered = None, {}

    def _classes(self, inp) -> tuple[np.ndarray, np.ndarray]:
        from ..geo.synthetic import NO_CLASS, classify

        if inp.task == "none":
            return self.classes, self.widths
        classes, widths = classify(inp.tags, self.pieces.osm_id)
        classes = np.where(inp.kept, classes, NO_CLASS)
        return classes, widths

    def changed_blocks(self, inp) -> np.ndarray:
        """Indices into ``blocks`` of the blocks whose render differs under ``inp``."""
        classes, widths = self._classes(inp)
        differs = self.paintable & ((classes != self.classes) | ((classes >= 0) & (widths != self.widths)))
        return np.unique(self.tile_block[self.pieces.tile[differs]])

    def changed(self, inp) -> np.ndarray:
        return np.isin(self.tile_block, self.changed_blocks(inp))

    def render_block(self, block: int, inp) -> dict[int, np.ndarray | None]:
        """{region row: chip (224, 224, 4) or None} of the tiles of ``blocks[block]``, rendered from ``inp``'s pieces."""
        import tempfile

        from ..geo.synthetic import SYNTHETIC_ACQUIRED, SyntheticBlock, render_block, write_cog

        classes, widths = self._classes(inp)
        rows = np.flatnonzero(self.tile_block == block)
        sel = np.flatnonzero(np.isin(self.pieces.tile, rows) & (classes >= 0))  # region order, as naip_scenes painted
        geoms = shapely.from_wkb(self.wkb[sel])
        tile = self.pieces.tile[sel]
        coords, index = shapely.get_coordinates(geoms, return_index=True)
        geoms = shapely.set_coordinates(geoms, coords + np.column_stack([self.x0[tile], self.y0[tile]])[index])
        bx, by = (int(v) for v in self.blocks[block])
        n = self.block_tiles
        spec = SyntheticBlock(bx, by, bx * n * self.size, by * n * self.size, n * self.size)
        image = render_block(spec, geoms, classes[sel], widths[sel], seed=self.seed, res_m=self.res_m)
        scene_id = f"synthetic-{self.epsg}-{bx}_{by}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"synthetic-{bx}_{by}.tif"
            write_cog(path, image, self.epsg, spec.left_m, spec.bottom_m + spec.size_m, self.res_m, SYNTHETIC_ACQUIRED)
            scene = inspect_scene(path, sha256_file(path), scene_id=scene_id)
            scenes = [scene if s.scene_id == scene_id else s for s in self.scenes]
            chips = _chip_rows(scenes, self.epsg, self.x0[rows], self.y0[rows], np.full(len(rows), self.size))
        return {int(r): (c.image if c.coverage > 0 else None) for r, c in zip(rows, chips)}

    def chips(self, rows: np.ndarray, inp) -> tuple[np.ndarray, np.ndarray]:
        images, has = self.stored.chips(rows, inp)
        if inp is None or inp.task == "none":
            return images, has
        if self._task is not inp:  # a new task's input: its own renders
            self._task, self._rendered, self._changed = inp, {}, set(self.changed_blocks(inp).tolist())
        for i, row in enumerate(np.asarray(rows).tolist()):
            block = int(self.tile_block[row])
            if block not in self._changed:
                continue
            if block not in self._rendered:
                self._rendered[block] = self.render_block(block, inp)
                while len(self._rendered) > RENDER_CACHE_BLOCKS:  # rows come in runs of nearby tiles
                    self._rendered.pop(next(iter(self._rendered)))
            chip = self._rendered[block][row]
            images[i], has[i] = (chip, True) if chip is not None else (0, False)
        return images, has
