"""``tile_embeddings[region, variant]`` without Dagster: every tile of a region embedded with a variant's checkpoint.

The product of training: one GeoParquet file per (region, variant) version,
``embeddings/<region>.<variant>/<data_version>/tile_embeddings.parquet``, one row per tile in shard order:

- ``tile_id``, ``tile_x``, ``tile_y`` (indices on the region's UTM grid);
- ``geometry``: the tile's square in EPSG:4326 (the primary geometry, what a GIS draws), and ``geometry_utm``:
  the same square in its UTM CRS (exact metres), both WKB with their CRS in the ``geo`` metadata (GeoParquet 1.1);
- ``embedding``: ``fixed_size_list<float32>[2d]``, the target encoder's concat(mean, max) over the tile's valid
  tokens (every piece: no cap, no truncation; long tiles get batches of their own), as evaluation embeds a tile;
- ``model``, ``model_version``, ``tokens_version``: what made the row (dictionary-encoded, so they cost nothing).

The region need not be one the checkpoint trained on (that is inference); its tokens must come from the
checkpoint's own tokenizers (tag model and geometry encoder), or the build is refused. Streams a tile shard
at a time, so memory is one shard's tokens and its embeddings, whatever the region.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..columns import fixed_list_to_numpy, matrix_to_numpy, numpy_to_fixed_list
from ..errors import GeojepaError
from ..model.config import VARIANTS
from ..settings import Settings
from ..store import CHECKPOINTS, EMBEDDINGS, IMAGES, TILE_EMBEDDINGS_FILE, TILE_INDEX_FILE, TILES, TOKENS, Dataset, Store, aligned_shards

EMBEDDINGS_SCHEMA_VERSION = 1
GEO_METADATA_VERSION = "1.1.0"
PCA_MAP_MAX_PX = 720
Log = Callable[[str], None]


def embedding_scope(region: str, variant: str) -> str:
    """The store scope of a region's embeddings by one variant: ``<region>.<variant>`` (region names have no dot)."""
    if variant not in VARIANTS:
        raise GeojepaError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return f"{region}.{variant}"


def split_scope(scope: str) -> tuple[str, str]:
    """(region, variant) of an ``embedding_scope``."""
    region, _, variant = scope.rpartition(".")
    return region, variant


@dataclass
class TileEmbeddingsResult:
    dataset: Dataset
    n_tiles: int
    dim: int
    model_version: str
    checkpoint: str  # its data version
    tokens_version: str
    seconds: float
    pca_map_png: bytes
    unchanged: bool = False


def _tokenizers_match(ck: Dataset, tokens: Dataset, region: str, variant: str) -> None:
    """Refuse tokens made by other tokenizers than the checkpoint's: their vectors mean something else."""
    want, have = ck.manifest["inputs"], tokens.manifest["inputs"]
    for key, what in (("tag_embeddings", "tag model"), ("geometry_encoder", "geometry encoder")):
        if want.get(key) != have.get(key):
            raise GeojepaError(
                f"tile_tokens[{region}] ({tokens.data_version}) were made with another {what} ({key} {have.get(key)}) than "
                f"the geojepa_checkpoint[{variant}] ({ck.data_version}) was trained with ({want.get(key)}); materialize "
                f"tile_tokens[{region}] again with the checkpoint's {key}, or train the checkpoint on these tokens")


def _model_version(settings: Settings, variant: str, ck: Dataset) -> str:
    """``geojepa-<variant>:<n>``: the MLflow model version registered for the checkpoint (else ``...@<data version>``)."""
    from ..train.tracking import registered_version, tracking_uri

    version = registered_version(tracking_uri(settings.mlflow_dir), variant, ck.data_version)
    return f"geojepa-{variant}:{version.version}" if version is not None else f"geojepa-{variant}@{ck.data_version}"


def tile_squares(tile_x: np.ndarray, tile_y: np.ndarray, tile_size_m: float, epsg: int) -> tuple[np.ndarray, np.ndarray]:
    """(WKB of each tile's square in EPSG:4326, WKB in UTM ``epsg``) for (T,) grid indices; 4326 edges densified
    (8 points a side) so that the square a GIS draws follows the UTM one."""
    import shapely
    from pyproj import Transformer

    s = float(tile_size_m)
    utm = shapely.box(tile_x * s, tile_y * s, (tile_x + 1) * s, (tile_y + 1) * s)
    to_lonlat = Transformer.from_crs(epsg, 4326, always_xy=True)
    dense = shapely.segmentize(utm, s / 8)
    lonlat = shapely.transform(dense, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
    return shapely.to_wkb(lonlat), shapely.to_wkb(utm)


def _geo_metadata(epsg: int, bbox_lonlat: list[float]) -> bytes:
    """GeoParquet ``geo`` file metadata: two WKB polygon columns, each with its CRS as PROJJSON."""
    from pyproj import CRS

    col = lambda crs, bbox=None: {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS.from_epsg(crs).to_json_dict(),  # noqa: E731
                                  **({"bbox": bbox} if bbox else {})}
    return json.dumps({"version": GEO_METADATA_VERSION, "primary_column": "geometry",
                       "columns": {"geometry": col(4326, bbox_lonlat), "geometry_utm": col(epsg)}}).encode()


KEEP_FREED_BYTES = 1 << 30  # glibc trim threshold while embedding: freed batch memory stays for the next batch


def keep_freed_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse (``mallopt``: large blocks from the heap, not fresh mmaps,
    and no trim below ``KEEP_FREED_BYTES``) for the rest of the process. Each batch's padded tensors and the forward's
    activations are tens of MB; by default every one is a fresh mapping whose pages fault in again (up to 56k faults
    per pass over the demo shard). ``bench/embed.py`` measured the loader at 0.67-0.80x of the forward alone without
    it, 0.81-0.83x with it. RSS stays at its peak instead of falling back. False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def shard_batches(tiles_path: Path, tokens_path: Path, chips, row0: int, uses_images: bool):
    """(tiles (tile_id, tile_x, tile_y, n_entities), batches) of one tile shard: every piece a token, tiles batched by
    length (``evaluate.run._length_batches``). ``batches`` yields (rows, batch) lazily, a batch built when it is
    asked for: the dict of tensors ``GeoJEPA.tile_embedding`` reads. One batch alive at a time keeps the forward's
    memory warm (building them all first measured 0.75x of the forward alone, lazily 0.82x; ``list()`` it to keep
    them). ``row0``: the shard's first tile among the region's (where ``chips`` finds its images)."""
    from ..evaluate.run import _length_batches

    t = pq.read_table(tiles_path, columns=["tile_id", "tile_x", "tile_y", "n_entities"])
    k = pq.read_table(tokens_path, columns=["tag_token", "geometry_token", "position"], memory_map=True)
    # tokens stay float16 (half the bytes gathered); each padded batch becomes float32 in torch (numpy's cast is ~10x slower)
    tokens = [(name, matrix_to_numpy(k.column(c))) for name, c in (("tag", "tag_token"), ("geometry", "geometry_token"), ("position", "position"))]
    counts = t.column("n_entities").to_numpy().astype(np.int64)
    plan = _length_batches(counts, 196 if uses_images else 0)
    return t, _batches(plan, counts, tokens, chips, row0, uses_images)


def _batches(plan, counts: np.ndarray, tokens: list, chips, row0: int, uses_images: bool):
    import torch

    from ..geo.grid import ranges

    starts = np.concatenate([[0], np.cumsum(counts)])
    for rows, length in plan:
        b = len(rows)
        n = counts[rows]
        src = ranges(starts, rows)  # every token of the batch's tiles, tile by tile
        at_row = np.repeat(np.arange(b), n)  # where each goes: its tile's row, its rank in the tile
        at_col = np.arange(len(src)) - np.repeat(np.cumsum(n) - n, n)
        batch = {}
        for name, values in tokens:
            padded = np.zeros((b, length, values.shape[1]), values.dtype)
            padded[at_row, at_col] = values[src]
            batch[name] = torch.from_numpy(padded).float()
        valid = np.zeros((b, length), bool)
        valid[at_row, at_col] = True
        batch["valid"] = torch.from_numpy(valid)
        if uses_images:
            images, has = chips.chips(row0 + rows)
            batch["images"], batch["has_image"] = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(has)
        yield rows, batch


def embed_batches(model, batches, n_tiles: int) -> np.ndarray:
    """(n_tiles, 2d) float32: ``model.tile_embedding`` of each of ``shard_batches``' batches (any iterable), in tile order."""
    import torch

    out = np.zeros((n_tiles, 2 * model.cfg.dim), np.float32)
    with torch.no_grad():
        for rows, batch in batches:
            out[rows] = model.tile_embedding(batch).numpy()
    return out


def _shard_embeddings(model, tiles_path: Path, tokens_path: Path, chips, row0: int, uses_images: bool) -> tuple[pa.Table, np.ndarray]:
    """(tiles (tile_id, tile_x, tile_y), (T, 2d) float32 embeddings) of one tile shard."""
    t, batches = shard_batches(tiles_path, tokens_path, chips, row0, uses_images)
    return t.select(["tile_id", "tile_x", "tile_y"]), embed_batches(model, batches, t.num_rows)


def pca_rgb(embeddings: np.ndarray, max_fit: int = 50_000, seed: int = 0) -> np.ndarray:
    """(T, 3) uint8: the first 3 principal components of (T, D) ``embeddings``, each stretched to 0..255 between its
    2nd and 98th percentile (fitted on at most ``max_fit`` rows)."""
    x = np.asarray(embeddings, np.float64)
    if len(x) == 0:
        return np.zeros((0, 3), np.uint8)
    fit = x if len(x) <= max_fit else x[np.random.default_rng(seed).choice(len(x), max_fit, replace=False)]
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    comps = vt[:3] if len(vt) >= 3 else np.vstack([vt, np.zeros((3 - len(vt), x.shape[1]))])
    proj = (x - mean) @ comps.T
    lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
    return (np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255).round().astype(np.uint8)


def pca_map_png(tile_x: np.ndarray, tile_y: np.ndarray, embeddings: np.ndarray, title: str) -> bytes:
    """A map of the region's tiles coloured by the first 3 PCA components of their embeddings (as RGB)."""
    from ..geo.render import tile_map_png

    return tile_map_png(tile_x, tile_y, pca_rgb(embeddings), f"RGB = PCA 1-3 of the embeddings  {title}", PCA_MAP_MAX_PX)


def build_tile_embeddings(region: str, variant: str, store: Store, settings: Settings, log: Log | None = None) -> TileEmbeddingsResult:
    """Embed every tile of ``region``'s current tile tokens with ``variant``'s current checkpoint; commit
    ``embeddings/<region>.<variant>/<dv>`` (module docstring). Its data version follows the checkpoint, the tokens
    (and, for image variants, the chips) it read."""
    import shapely

    from .evaluation import load_checkpoint_model

    log = log or (lambda m: None)
    t0 = time.perf_counter()
    scope = embedding_scope(region, variant)
    ck = store.require(CHECKPOINTS, variant)
    tokens = store.require(TOKENS, region)
    _tokenizers_match(ck, tokens, region, variant)
    tiles = store.dataset(TILES, region, tokens.manifest["inputs"]["tile_shards"])
    uses_images = VARIANTS[variant].images
    images = chips = None
    if uses_images:
        images = store.current(IMAGES, region)
        if images is None or images.manifest["inputs"]["tile_shards"] != tiles.data_version:
            raise GeojepaError(f"variant {variant} reads image chips, and region {region!r} has no tile_images cut from its "
                               f"tile_shards {tiles.data_version}; materialize tile_images[{region}] first")
        from .evaluation import imagery_kind
        from .imagery import StoredChips

        chips = StoredChips(images, imagery_kind(store, region, images.data_version))
    model, _ = load_checkpoint_model(ck)
    keep_freed_heap()
    model_version = _model_version(settings, variant, ck)
    inputs = {"checkpoint": ck.data_version, "tile_tokens": tokens.data_version, "tile_shards": tiles.data_version,
              "tile_images": images.data_version if images is not None else None}
    epsg, size = int(tiles.manifest["epsg"]), float(tiles.manifest["tile_size_m"])
    n_tiles = int(tiles.manifest["n_tiles"])
    dim = 2 * model.cfg.dim
    log(f"tile_embeddings[{region}|{variant}]: {n_tiles:,} tiles with {model_version} (checkpoint {ck.data_version})")
    schema = pa.schema([("tile_id", pa.string()), ("tile_x", pa.int32()), ("tile_y", pa.int32()),
                        ("geometry", pa.binary()), ("geometry_utm", pa.binary()),
                        ("embedding", pa.list_(pa.float32(), dim)),
                        ("model", pa.dictionary(pa.int8(), pa.string())), ("model_version", pa.dictionary(pa.int8(), pa.string())),
                        ("tokens_version", pa.dictionary(pa.int8(), pa.string()))])
    xs, ys, sample = [], [], []  # every tile's position and embedding, for the PCA map and the kNN index
    done, row0 = 0, 0
    with store.writing(EMBEDDINGS, scope) as staging:
        path = staging.file(TILE_EMBEDDINGS_FILE)
        bbox = [np.inf, np.inf, -np.inf, -np.inf]
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for tiles_path, tokens_path in aligned_shards((tiles, "tiles"), (tokens, "tokens")):
                t, emb = _shard_embeddings(model, tiles_path, tokens_path, chips, row0, uses_images)
                tx, ty = t.column("tile_x").to_numpy().astype(np.int64), t.column("tile_y").to_numpy().astype(np.int64)
                lonlat, utm = tile_squares(tx, ty, size, epsg)
                b = shapely.total_bounds(shapely.from_wkb(lonlat))
                bbox = [min(bbox[0], b[0]), min(bbox[1], b[1]), max(bbox[2], b[2]), max(bbox[3], b[3])]
                n = t.num_rows
                const = lambda v: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([v]))  # noqa: E731
                writer.write_table(pa.Table.from_arrays(
                    [t.column("tile_id"), pa.array(tx, pa.int32()), pa.array(ty, pa.int32()), pa.array(lonlat, pa.binary()),
                     pa.array(utm, pa.binary()), numpy_to_fixed_list(emb, pa.float32()),
                     const(f"geojepa-{variant}"), const(model_version), const(tokens.data_version)], schema=schema))
                xs.append(tx)
                ys.append(ty)
                sample.append(emb)
                row0 += n
                done += n
                log(f"tile_embeddings[{region}|{variant}]: {done:,}/{n_tiles:,} tiles ({done / max(time.perf_counter() - t0, 1e-9):,.0f} tiles/s)")
            writer.add_key_value_metadata({"geo": _geo_metadata(epsg, [float(v) for v in bbox]) if done else _geo_metadata(epsg, None)})
        all_emb = np.concatenate(sample) if sample else np.zeros((0, dim), np.float32)
        from ..evaluate import index as knn_index

        if done >= knn_index.EXACT_MAX:  # past this a query is a compressed scan + re-rank (evaluate.index), stored so no query builds it
            t = time.perf_counter()
            knn_index.CosineIndex(all_emb, exact_max=knn_index.EXACT_MAX).save(staging.file(TILE_INDEX_FILE))
            log(f"tile_embeddings[{region}|{variant}]: kNN index of {done:,} tiles built in {time.perf_counter() - t:.1f} s")
        staging.manifest = {"schema_version": EMBEDDINGS_SCHEMA_VERSION, "region": region, "variant": variant,
                            "model_version": model_version, "n_tiles": done, "dim": dim, "dtype": "float32", "epsg": epsg,
                            "tile_size_m": size, "bbox_lonlat": [round(float(v), 7) for v in bbox] if done else None,
                            "inputs": inputs}
    ds = staging.dataset
    png = pca_map_png(np.concatenate(xs) if xs else np.zeros(0), np.concatenate(ys) if ys else np.zeros(0), all_emb,
                      f"{region}, {model_version}")
    seconds = time.perf_counter() - t0
    log(f"tile_embeddings[{region}|{variant}] -> {ds.path} ({done:,} tiles, {done / max(seconds, 1e-9):,.0f} tiles/s)")
    return TileEmbeddingsResult(ds, done, dim, model_version, ck.data_version, tokens.data_version, seconds, png)


def load_embeddings(region: str, variant: str = "GT", home: str | Path | None = None, crs: str = "EPSG:4326"):
    """The current embeddings of ``region`` by ``variant`` as a GeoDataFrame (one row per tile, ``embedding`` a
    (2d,) float32 array per row), without Dagster: ``from geojepa_pipeline import load_embeddings``.

    ``crs``: ``EPSG:4326`` (the default: the ``geometry`` column) or ``utm`` (the ``geometry_utm`` column as the
    geometry). ``home``: the GEOJEPA_HOME (default: the environment's)."""
    import geopandas as gpd

    from ..settings import get_settings

    settings = get_settings(home)
    store = Store(settings.store_root, cache=settings.store_cache)
    ds = store.require(EMBEDDINGS, embedding_scope(region, variant))
    gdf = gpd.read_parquet(ds.verified_file(TILE_EMBEDDINGS_FILE))
    if crs == "utm":
        gdf = gdf.set_geometry("geometry_utm")
    elif crs != "EPSG:4326":
        raise GeojepaError(f"load_embeddings: crs must be 'EPSG:4326' or 'utm', got {crs!r}")
    return gdf


# ---- queries: the tile at a place, its nearest tiles, the tiles in a box ---------------------------
@dataclass
class TileHit:
    """One tile of a region's embeddings: where it is in the file and what it is."""

    region: str
    row: int  # its row in the region's tile_embeddings.parquet
    tile_id: str
    lon: float  # the tile's centre, degrees
    lat: float
    score: float = float("nan")  # cosine similarity to the query (neighbours only)


def embedding_datasets(store: Store, variant: str) -> dict[str, Dataset]:
    """region -> the current ``tile_embeddings`` of every region embedded by ``variant``."""
    out = {}
    for scope in store.regions(EMBEDDINGS):
        region, v = split_scope(scope)
        if v == variant:
            out[region] = store.current(EMBEDDINGS, scope)
    return out


def _extents(sets: dict[str, Dataset]) -> str:
    return "; ".join(f"{r} W,S,E,N {','.join(f'{v:.4f}' for v in ds.manifest['bbox_lonlat'])}" for r, ds in sorted(sets.items())
                     if ds.manifest.get("bbox_lonlat")) or "none"


def _no_embeddings(store: Store, variant: str) -> GeojepaError:
    others = sorted({split_scope(s)[1] for s in store.regions(EMBEDDINGS)})
    more = f" (there are embeddings by {', '.join(others)}: --variant {others[0]})" if others else ""
    return GeojepaError(f"no region has tile_embeddings by variant {variant}{more}; "
                        f"materialize them: geojepa materialize --select tile_embeddings --variant {variant}")


class EmbeddedRegion:
    """One region's current ``tile_embeddings``, opened for place queries (``place_answer``).

    What it reads it keeps, so a resident server (``embed_server``) answers from memory. ``resident``: also hold
    every embedding and tile id (a server; 512 MB per 1M 128-d tiles); otherwise a query reads only the row
    groups that hold its rows (one CLI call)."""

    def __init__(self, region: str, ds: Dataset, resident: bool = False):
        self.region, self.ds, self.resident = region, ds, resident
        self.epsg, self.size = int(ds.manifest["epsg"]), float(ds.manifest["tile_size_m"])
        self.bbox = ds.manifest.get("bbox_lonlat")
        self._xy = self._keys = self._order = self._all = self._ids = self._index = None
        self._transformers: dict = {}

    def transformer(self, src: int, dst: int):
        """A pyproj Transformer (lon/lat order), made once per region."""
        from pyproj import Transformer

        key = (src, dst)
        if key not in self._transformers:
            self._transformers[key] = Transformer.from_crs(src, dst, always_xy=True)
        return self._transformers[key]

    def load(self) -> "EmbeddedRegion":
        """Read everything a query touches now (a server does, once per version), not at the first query."""
        self.tile_xy()
        self.index()
        if self.resident:
            self._sorted_keys()
            self.vectors(np.zeros(0, np.int64))
            self.tile_ids(np.zeros(0, np.int64))
        return self

    def tile_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """(tile_x, tile_y) int64 of every row, on the region's UTM grid."""
        if self._xy is None:
            t = pq.read_table(self.ds.file(TILE_EMBEDDINGS_FILE), columns=["tile_x", "tile_y"])
            self._xy = t.column("tile_x").to_numpy().astype(np.int64), t.column("tile_y").to_numpy().astype(np.int64)
        return self._xy

    def _sorted_keys(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None:
            tx, ty = self.tile_xy()
            keys = (tx << 32) | (ty & 0xFFFFFFFF)
            self._order = np.argsort(keys, kind="stable")
            self._keys = keys[self._order]
        return self._keys, self._order

    def contains(self, lon: float, lat: float) -> bool:
        """Inside the region's extent (its tiles' bounding box, degrees)."""
        w, s_, e, n = self.bbox or (np.inf, np.inf, -np.inf, -np.inf)
        return bool(w <= lon <= e and s_ <= lat <= n)

    def row_at(self, lon: float, lat: float) -> int | None:
        """The row of the tile that holds (``lon``, ``lat``), or None where no tile is."""
        x, y = self.transformer(4326, self.epsg).transform(lon, lat)
        kx, ky = int(np.floor(x / self.size)), int(np.floor(y / self.size))
        if self.resident:
            keys, order = self._sorted_keys()
            key = (kx << 32) | (ky & 0xFFFFFFFF)
            i = int(np.searchsorted(keys, key))
            return int(order[i]) if i < len(keys) and keys[i] == key else None
        tx, ty = self.tile_xy()
        rows = np.flatnonzero((tx == kx) & (ty == ky))
        return int(rows[0]) if len(rows) else None

    def vectors(self, rows) -> np.ndarray:
        """(len(rows), 2d) float32 embeddings, exactly as stored."""
        rows = np.asarray(rows, np.int64)
        if self.resident:
            if self._all is None:
                self._all = read_embeddings(self.ds)
            return self._all[rows]
        return read_embeddings(self.ds, rows) if len(rows) else np.zeros((0, int(self.ds.manifest["dim"])), np.float32)

    def tile_ids(self, rows) -> list[str]:
        rows = np.asarray(rows, np.int64)
        if self.resident:
            if self._ids is None:
                self._ids = pq.read_table(self.ds.file(TILE_EMBEDDINGS_FILE), columns=["tile_id"]).column("tile_id").combine_chunks()
            return self._ids.take(pa.array(rows)).to_pylist()
        return _read_rows(self.ds.file(TILE_EMBEDDINGS_FILE), rows, ["tile_id"]).column("tile_id").to_pylist() if len(rows) else []

    def centres(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(lon, lat) degrees of the centres of tiles ``rows``."""
        tx, ty = self.tile_xy()
        rows = np.asarray(rows, np.int64)
        lon, lat = self.transformer(self.epsg, 4326).transform((tx[rows] + 0.5) * self.size, (ty[rows] + 0.5) * self.size)
        return np.atleast_1d(lon), np.atleast_1d(lat)

    def index(self):
        """The region's cosine kNN index: the stored one (past ``EXACT_MAX`` tiles), else exact over its embeddings."""
        from ..evaluate.index import CosineIndex

        if self._index is None:
            self._index = (CosineIndex.load(self.ds.file(TILE_INDEX_FILE)) if self.ds.has_file(TILE_INDEX_FILE)
                           else CosineIndex(self.vectors(np.arange(len(self.tile_xy()[0])))))
        return self._index

    def hit(self, row: int, score: float = float("nan")) -> TileHit:
        lon, lat = self.centres([row])
        return TileHit(self.region, row, self.tile_ids([row])[0], float(lon[0]), float(lat[0]), score)


def embedded_regions(store: Store, variant: str, resident: bool = False, opened: dict | None = None) -> dict[str, EmbeddedRegion]:
    """region -> ``EmbeddedRegion`` of every region's current embeddings by ``variant``. ``opened``: those of an
    earlier call (a server's), reused where their version is still current; the others are opened anew."""
    opened = opened or {}
    out = {}
    for region, ds in embedding_datasets(store, variant).items():
        old = opened.get(region)
        out[region] = old if old is not None and old.ds.data_version == ds.data_version else EmbeddedRegion(region, ds, resident)
    return out


def tile_at(store: Store, variant: str, lon: float, lat: float, regions: dict[str, EmbeddedRegion] | None = None) -> TileHit:
    """The tile of the embedded regions that holds (``lon``, ``lat``), or one line that names the regions and their extents."""
    regions = embedded_regions(store, variant) if regions is None else regions
    if not regions:
        raise _no_embeddings(store, variant)
    inside = []
    for name, er in sorted(regions.items()):
        if not er.contains(lon, lat):
            continue
        inside.append(name)
        row = er.row_at(lon, lat)
        if row is not None:
            return er.hit(row)
    if inside:
        raise GeojepaError(f"lat {lat}, lon {lon} is inside {', '.join(inside)} but on no tile: the 300 m tile there holds no "
                           f"OSM entity (tiles exist only where entities are)")
    raise GeojepaError(f"lat {lat}, lon {lon} is outside every region embedded by {variant}: "
                       f"{_extents({r: er.ds for r, er in regions.items()})}")


def read_embeddings(ds: Dataset, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, 2d) float32: the embeddings of ``rows`` (default all) of one ``tile_embeddings`` dataset. Only the row
    groups that hold ``rows`` are read (a query's one row is not the whole column: 512 MB at 1M tiles)."""
    path = ds.file(TILE_EMBEDDINGS_FILE)
    if rows is None:
        return fixed_list_to_numpy(pq.read_table(path, columns=["embedding"]).column("embedding"))
    return fixed_list_to_numpy(_read_rows(path, np.asarray(rows, np.int64), ["embedding"]).column("embedding"))


def _read_rows(path: Path, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows ``rows`` of a Parquet file, in that order, reading only the row groups that hold them."""
    f = pq.ParquetFile(path)
    starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
    groups = np.searchsorted(starts, rows, side="right") - 1
    needed = sorted(set(groups.tolist()))
    table = f.read_row_groups(needed, columns=columns)
    offset = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in needed])
    at = {g: offset[i] for i, g in enumerate(needed)}
    return table.take(pa.array([at[g] + r - starts[g] for g, r in zip(groups.tolist(), rows.tolist())], pa.int64()))


def nearest_tiles(store: Store, variant: str, query: np.ndarray, k: int, exclude: TileHit | None = None,
                  regions: dict[str, EmbeddedRegion] | None = None) -> list[TileHit]:
    """The ``k`` tiles of all regions embedded by ``variant`` most cosine-similar to ``query`` (2d,), best first
    (``exclude``: the query's own tile). A region with a stored index (``INDEX_FILE``, past ``EXACT_MAX`` tiles)
    is searched with it; the others exactly."""
    regions = embedded_regions(store, variant) if regions is None else regions
    hits = []
    for name, er in sorted(regions.items()):
        scores, rows = er.index().search(query[None, :], k + 1)
        found = [(int(r), float(sc)) for r, sc in zip(rows[0], scores[0])
                 if r >= 0 and not (exclude is not None and exclude.region == name and exclude.row == r)][:k]
        if not found:
            continue
        sel = np.array([r for r, _ in found])
        lon, lat = er.centres(sel)
        ids = er.tile_ids(sel)
        hits += [TileHit(name, r, ids[i], float(lon[i]), float(lat[i]), sc) for i, (r, sc) in enumerate(found)]
    return sorted(hits, key=lambda h: -h.score)[:k]


def place_answer(store: Store, variant: str, lon: float, lat: float, k: int,
                 regions: dict[str, EmbeddedRegion] | None = None) -> dict:
    """What ``geojepa embed --lat --lon --json`` prints: the tile at the place, its embedding, the model and data
    versions, and its ``k`` nearest tiles over every region embedded by ``variant`` (``cli_light.format_place`` prints it)."""
    regions = embedded_regions(store, variant) if regions is None else regions
    hit = tile_at(store, variant, lon, lat, regions)
    er = regions[hit.region]
    vec = er.vectors([hit.row])[0]
    near = nearest_tiles(store, variant, vec, k, exclude=hit, regions=regions)
    ds = er.ds
    return {"region": hit.region, "tile_id": hit.tile_id, "lon": hit.lon, "lat": hit.lat, "variant": variant,
            "model_version": ds.manifest["model_version"], "embeddings_version": ds.data_version,
            "tokens_version": ds.manifest["inputs"]["tile_tokens"], "embedding": [float(v) for v in vec],
            "neighbours": [{"region": h.region, "tile_id": h.tile_id, "lon": h.lon, "lat": h.lat,
                            "cosine": h.score, "distance": 1.0 - h.score} for h in near]}


def embeddings_in_bbox(store: Store, variant: str, bbox: tuple[float, float, float, float], out: Path) -> int:
    """Write every embedded tile (by ``variant``) whose square meets ``bbox`` (W, S, E, N degrees) to ``out``: GeoParquet
    with the columns of ``tile_embeddings`` and ``region``; ``geometry_utm`` only when every region shares one UTM
    zone. Atomic (a temporary file renamed). Returns the rows written; 0 rows is an error that names the extents."""
    import os

    import shapely

    regions = embedded_regions(store, variant)
    if not regions:
        raise _no_embeddings(store, variant)
    sets = {name: er.ds for name, er in regions.items()}
    w, s_, e, n = bbox
    if not (w < e and s_ < n):
        raise GeojepaError(f"--bbox {w},{s_},{e},{n}: W must be below E and S below N")
    area = shapely.segmentize(shapely.box(w, s_, e, n), min(e - w, n - s_) / 16)
    parts = []
    for region, er in sorted(regions.items()):
        ds, epsg, size = er.ds, er.epsg, er.size
        to_utm = er.transformer(4326, epsg)
        area_utm = shapely.transform(area, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))
        tx, ty = er.tile_xy()
        x0, y0, x1, y1 = shapely.bounds(area_utm)
        cand = np.flatnonzero((tx >= np.floor(x0 / size) - 1) & (tx <= x1 / size) & (ty >= np.floor(y0 / size) - 1) & (ty <= y1 / size))
        if len(cand):
            squares = shapely.box(tx[cand] * size, ty[cand] * size, (tx[cand] + 1) * size, (ty[cand] + 1) * size)
            cand = cand[shapely.intersects(squares, area_utm)]
        if len(cand):
            t = pq.read_table(ds.file(TILE_EMBEDDINGS_FILE)).take(pa.array(cand))
            parts.append((region, epsg, t.append_column("region", pa.array([region] * t.num_rows, pa.string()))))
    if not parts:
        raise GeojepaError(f"--bbox {w},{s_},{e},{n} meets no embedded tile by {variant}: {_extents(sets)}")
    one_zone = len({epsg for _, epsg, _ in parts}) == 1
    tables = [t if one_zone else t.drop_columns(["geometry_utm"]) for _, _, t in parts]
    table = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    geo = json.loads(pq.read_metadata(next(iter(sets.values())).file(TILE_EMBEDDINGS_FILE)).metadata[b"geo"])
    geo["columns"]["geometry"].pop("bbox", None)
    if one_zone:
        from pyproj import CRS

        geo["columns"]["geometry_utm"]["crs"] = CRS.from_epsg(parts[0][1]).to_json_dict()
    else:
        geo["columns"].pop("geometry_utm", None)
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return table.num_rows
