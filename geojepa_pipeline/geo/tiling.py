"""OSM features -> 300 m tile tables (tiles + entity pieces), ready to shard.

``tile_osm(entities)`` projects the features to their UTM zone, repairs invalid geometries,
clips them to the grid and gives every piece its minimum rotated box, tile-local WKB and
type. It returns Arrow tables in a deterministic, spatially blocked order: tiles sorted by
16x16-tile blocks (4.8 km squares at 300 m), row-major inside a block; pieces sorted by tile,
then OSM type and id. Every kept feature appears in at least one tile, or is counted under
``dropped``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer

from .grid import TILE_SIZE_M, choose_epsg, clip_to_grid, minbox_corners, project, tile_ids
from .osm_read import OSM_TYPE_NAMES, OsmEntities

SCHEMA_VERSION = 1
BLOCK_TILES = 16  # tiles per side of a sort block
AREA_REL_TOL = 1e-6

GEOMETRY_TYPE_NAMES = (
    "Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon", "GeometryCollection",
)

TILES_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("region", pa.string()),
    ("epsg", pa.int32()),
    ("tile_x", pa.int32()),  # grid column: x_min_m / tile_size_m
    ("tile_y", pa.int32()),
    ("x_min_m", pa.float64()),  # lower-left corner in the UTM CRS, metres
    ("y_min_m", pa.float64()),
    ("tile_size_m", pa.float32()),
    ("lon", pa.float64()),  # tile centre, degrees
    ("lat", pa.float64()),
    ("n_entities", pa.int32()),
    ("n_nodes", pa.int32()),
    ("n_ways", pa.int32()),
    ("n_relations", pa.int32()),
])

ENTITIES_SCHEMA = pa.schema([
    ("tile_id", pa.string()),
    ("region", pa.string()),
    ("osm_type", pa.string()),  # node | way | relation
    ("osm_id", pa.int64()),
    ("tags", pa.map_(pa.string(), pa.string())),  # full filtered tag set of the entity
    ("geom_type", pa.string()),  # of the piece: Point, LineString, Polygon, Multi*, GeometryCollection
    ("geometry", pa.binary()),  # WKB, tile-local metres: (0, 0) is the tile's lower-left corner
    ("minbox", pa.list_(pa.float32(), 8)),  # min rotated rectangle, 4 corners (x, y) in [0, 1] tile units
    ("area_m2", pa.float64()),
    ("length_m", pa.float64()),
    ("is_clipped", pa.bool_()),  # the piece is a cut of a larger geometry
    ("entity_complete", pa.bool_()),  # all the entity's nodes/members lie in the extract
])


@dataclass
class TiledRegion:
    """Result of ``tile_osm``: whole-region tables plus accounting."""

    epsg: int
    tiles: pa.Table  # TILES_SCHEMA, one row per non-empty tile
    entities: pa.Table  # ENTITIES_SCHEMA, one row per (entity, tile) piece
    n_input: int  # features accounted for by the reader
    n_entities_kept: int  # distinct entities with at least one piece
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    area_check: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)

    def accounting(self) -> dict:
        """Counts that must add up: ``n_input == n_entities_kept + sum(dropped)``."""
        return {
            "n_input": self.n_input,
            "n_entities_kept": self.n_entities_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "balanced": self.n_input == self.n_entities_kept + sum(self.dropped.values()),
        }


def _repair(geoms: np.ndarray, repaired: Counter) -> np.ndarray:
    """make_valid on invalid geometries; polygonal ones keep only their polygonal structure."""
    invalid = np.flatnonzero(~shapely.is_valid(geoms))
    if len(invalid) == 0:
        return geoms
    geoms = geoms.copy()
    bad = geoms[invalid]
    polygonal = np.isin(shapely.get_type_id(bad), (3, 6))
    fixed = np.empty(len(bad), dtype=object)
    if polygonal.any():
        fixed[polygonal] = shapely.make_valid(bad[polygonal], method="structure", keep_collapsed=False)
    if (~polygonal).any():
        fixed[~polygonal] = shapely.make_valid(bad[~polygonal])
    geoms[invalid] = fixed
    repaired["make_valid"] += len(invalid)
    return geoms


def _tags_array(tags: list) -> pa.MapArray:
    offsets = np.zeros(len(tags) + 1, np.int32)
    offsets[1:] = np.cumsum([len(t) for t in tags])
    keys = [k for t in tags for k, _ in t]
    values = [v for t in tags for _, v in t]
    return pa.MapArray.from_arrays(pa.array(offsets), pa.array(keys, pa.string()), pa.array(values, pa.string()))


def tile_osm(entities: OsmEntities, region: str, tile_size_m: float = TILE_SIZE_M, log=None) -> TiledRegion:
    """Project, repair, clip and describe every kept feature (see the module docstring)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    dropped = Counter(entities.dropped)
    repaired = Counter(entities.repaired)
    if len(entities) == 0:
        raise ValueError("the extract holds no taggged features to tile")

    epsg = choose_epsg(entities.geometry)
    geoms = project(entities.geometry, epsg)
    timings["project"] = time.perf_counter() - t0

    t = time.perf_counter()
    geoms = _repair(geoms, repaired)
    empty = shapely.is_empty(geoms) | shapely.is_missing(geoms)
    dropped["empty_after_repair"] += int(empty.sum())
    valid_idx = np.flatnonzero(~empty)
    timings["repair"] = time.perf_counter() - t

    t = time.perf_counter()
    owner, tx, ty, pieces, clipped = clip_to_grid(geoms[valid_idx], tile_size_m)
    owner = valid_idx[owner]
    has_piece = np.zeros(len(entities), bool)
    has_piece[owner] = True
    dropped["no_tile_piece"] += int((~has_piece & ~empty).sum())
    timings["clip"] = time.perf_counter() - t

    # ---- order: tiles by 16x16 block, row-major within; pieces by tile, type, id -----------
    t = time.perf_counter()
    tile_key = np.stack([ty, tx], axis=1)
    uniq, inverse = np.unique(tile_key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    u_ty, u_tx = uniq[:, 0], uniq[:, 1]
    tile_order = np.lexsort((u_tx, u_ty, np.floor_divide(u_tx, BLOCK_TILES), np.floor_divide(u_ty, BLOCK_TILES)))
    rank = np.empty(len(uniq), np.int64)
    rank[tile_order] = np.arange(len(uniq))
    piece_tile = rank[inverse]
    order = np.lexsort((entities.osm_id[owner], entities.osm_type[owner], piece_tile))
    owner, tx, ty, pieces, clipped, piece_tile = owner[order], tx[order], ty[order], pieces[order], clipped[order], piece_tile[order]
    u_tx, u_ty = u_tx[tile_order], u_ty[tile_order]

    # ---- tile-local geometry, min boxes, measures ------------------------------------------
    coords, coord_owner = shapely.get_coordinates(pieces, return_index=True)
    origin = np.stack([tx, ty], axis=1).astype(np.float64) * tile_size_m
    local = shapely.set_coordinates(pieces.copy(), coords - origin[coord_owner])
    zeros = np.zeros(len(local))
    minbox = minbox_corners(local, zeros, zeros, tile_size_m)
    type_ids = shapely.get_type_id(local)
    area = shapely.area(local)
    length = shapely.length(local)
    timings["describe"] = time.perf_counter() - t

    # ---- area accounting for polygons wholly inside the extract ---------------------------
    ent_dim = shapely.get_dimensions(geoms)
    check = (ent_dim == 2) & entities.complete & has_piece
    piece_area_sum = np.bincount(owner, weights=area, minlength=len(entities))
    orig_area = shapely.area(geoms)
    rel = np.abs(piece_area_sum[check] - orig_area[check]) / np.maximum(orig_area[check], 1e-12)
    area_check = {
        "n_polygons_checked": int(check.sum()),
        "max_rel_error": float(rel.max()) if len(rel) else 0.0,
        "n_over_tolerance": int((rel > AREA_REL_TOL).sum()),
        "tolerance": AREA_REL_TOL,
    }

    # ---- Arrow tables ---------------------------------------------------------------------
    t = time.perf_counter()
    piece_ids = tile_ids(epsg, tx, ty)
    region_col = pa.array([region] * len(owner), pa.string()).dictionary_encode()
    type_names = np.asarray(OSM_TYPE_NAMES, dtype=object)[entities.osm_type[owner]]
    entity_tags = _tags_array(entities.tags)
    entities_table = pa.table(
        {
            "tile_id": pa.array(piece_ids, pa.string()),
            "region": region_col.cast(pa.string()),
            "osm_type": pa.array(type_names, pa.string()),
            "osm_id": pa.array(entities.osm_id[owner], pa.int64()),
            "tags": entity_tags.take(pa.array(owner)),
            "geom_type": pa.array(np.asarray(GEOMETRY_TYPE_NAMES, dtype=object)[type_ids], pa.string()),
            "geometry": pa.array(shapely.to_wkb(local, output_dimension=2), pa.binary()),
            "minbox": pa.FixedSizeListArray.from_arrays(pa.array(minbox.reshape(-1), pa.float32()), 8),
            "area_m2": pa.array(area, pa.float64()),
            "length_m": pa.array(length, pa.float64()),
            "is_clipped": pa.array(clipped, pa.bool_()),
            "entity_complete": pa.array(entities.complete[owner], pa.bool_()),
        },
        schema=ENTITIES_SCHEMA,
    )
    n_tiles = len(u_tx)
    per_type = np.zeros((n_tiles, 3), np.int64)
    np.add.at(per_type, (piece_tile, entities.osm_type[owner].astype(np.int64)), 1)
    to_lonlat = Transformer.from_crs(epsg, 4326, always_xy=True)
    lon, lat = to_lonlat.transform((u_tx + 0.5) * tile_size_m, (u_ty + 0.5) * tile_size_m)
    tiles_table = pa.table(
        {
            "tile_id": pa.array(tile_ids(epsg, u_tx, u_ty), pa.string()),
            "region": pa.array([region] * n_tiles, pa.string()),
            "epsg": pa.array(np.full(n_tiles, epsg), pa.int32()),
            "tile_x": pa.array(u_tx, pa.int32()),
            "tile_y": pa.array(u_ty, pa.int32()),
            "x_min_m": pa.array(u_tx * tile_size_m, pa.float64()),
            "y_min_m": pa.array(u_ty * tile_size_m, pa.float64()),
            "tile_size_m": pa.array(np.full(n_tiles, tile_size_m), pa.float32()),
            "lon": pa.array(np.asarray(lon), pa.float64()),
            "lat": pa.array(np.asarray(lat), pa.float64()),
            "n_entities": pa.array(per_type.sum(axis=1), pa.int32()),
            "n_nodes": pa.array(per_type[:, 0], pa.int32()),
            "n_ways": pa.array(per_type[:, 1], pa.int32()),
            "n_relations": pa.array(per_type[:, 2], pa.int32()),
        },
        schema=TILES_SCHEMA,
    )
    timings["tables"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result = TiledRegion(
        epsg=epsg, tiles=tiles_table, entities=entities_table, n_input=entities.n_input,
        n_entities_kept=int(has_piece.sum()), dropped=dropped, repaired=repaired,
        area_check=area_check, timings_s=timings,
    )
    if log:
        log(f"tiled {region}: EPSG:{epsg}, {n_tiles:,} tiles, {len(owner):,} pieces of {result.n_entities_kept:,} entities")
    return result
