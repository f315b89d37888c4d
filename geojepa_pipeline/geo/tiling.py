"""OSM features -> 300 m tile tables (tiles + entity pieces), ready to shard.

``tile_osm(data)`` projects the features to their UTM zone and cuts them into one piece
per (entity, tile):

* nodes: the half-open cell holding the point;
* lines (ways that are not areas): cut at the grid lines in numpy (``grid.cut_lines``);
* polygons (area ways and ``type=multipolygon`` relations): repaired with ``make_valid``
  where invalid, then intersected with the cells by GEOS (``grid.clip_to_grid``);
* every other relation: the union, per tile, of its members' pieces (members first), so a
  route or a boundary is exactly the set of its ways' pieces.

Every piece gets its minimum rotated box (4 corners in tile units), tile-local WKB and its
geometry type. Output order is deterministic and spatially blocked: tiles sorted by 16x16-tile
blocks (4.8 km squares at 300 m), row-major inside a block; pieces by tile, then OSM type and
id. Every kept feature appears in at least one tile, or is counted under ``dropped``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer

from .grid import TILE_SIZE_M, clip_to_grid, cut_lines, minbox_corners, utm_epsg
from .osm_read import OSM_TYPE_NAMES, OsmData

SCHEMA_VERSION = 1
BLOCK_TILES = 16  # tiles per side of a sort block
AREA_REL_TOL = 1e-6

GEOMETRY_TYPE_NAMES = (
    "Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon", "GeometryCollection",
)
_POINT, _LINESTRING, _POLYGON, _MULTIPOINT, _MULTILINESTRING, _COLLECTION = 0, 1, 3, 4, 5, 7

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
    ("is_clipped", pa.bool_()),  # the entity is split over several tiles
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


@dataclass
class _Pieces:
    """Accumulates pieces: owner entity, tile indices, tile-local geometry, length (NaN: ask GEOS)."""

    owner: list = field(default_factory=list)
    tx: list = field(default_factory=list)
    ty: list = field(default_factory=list)
    geom: list = field(default_factory=list)
    length: list = field(default_factory=list)

    def add(self, owner, tx, ty, geom, length=None) -> None:
        self.owner.append(np.asarray(owner, np.int64))
        self.tx.append(np.asarray(tx, np.int64))
        self.ty.append(np.asarray(ty, np.int64))
        self.geom.append(np.asarray(geom, dtype=object))
        self.length.append(np.full(len(geom), np.nan) if length is None else np.asarray(length, np.float64))

    def arrays(self):
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype)  # noqa: E731
        return (cat(self.owner, np.int64), cat(self.tx, np.int64), cat(self.ty, np.int64),
                cat(self.geom, object), cat(self.length, np.float64))


def _project(lonlat: np.ndarray, transformer: Transformer) -> np.ndarray:
    """(P, 2) lon/lat degrees -> (P, 2) metres."""
    if len(lonlat) == 0:
        return np.zeros((0, 2))
    x, y = transformer.transform(lonlat[:, 0], lonlat[:, 1])
    return np.column_stack([x, y])


def _repair(geoms: np.ndarray, repaired: Counter) -> np.ndarray:
    """make_valid on invalid polygons, keeping only their polygonal structure."""
    invalid = np.flatnonzero(~shapely.is_valid(geoms))
    if len(invalid) == 0:
        return geoms
    geoms = geoms.copy()
    geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    repaired["make_valid"] += len(invalid)
    return geoms


def _ring(xy: np.ndarray):
    return xy if len(xy) >= 4 and (xy[0] == xy[-1]).all() else None


def _assemble_multipolygon(outer: list[np.ndarray], inner: list[np.ndarray]):
    """Polygons from member coordinate arrays: union(outer faces) minus union(inner faces), or None."""
    def faces(parts):
        if all(_ring(p) is not None for p in parts):  # the common case: every member is a closed ring
            return np.asarray([shapely.Polygon(p) for p in parts], dtype=object)
        return shapely.get_parts(shapely.polygonize([shapely.LineString(p) for p in parts]))

    outer_faces = faces(outer)
    if len(outer_faces) == 0:
        return None
    geom = outer_faces[0] if len(outer_faces) == 1 and not inner else shapely.union_all(shapely.make_valid(outer_faces))
    if inner:
        inner_faces = faces(inner)
        if len(inner_faces):
            geom = shapely.difference(geom, shapely.union_all(shapely.make_valid(inner_faces)))
    return None if geom.is_empty else geom


def _collect_by_group(parts: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """One geometry per group from its parts (sorted by group): Multi* when one family, else a collection."""
    flat, part_of = shapely.get_parts(parts, return_index=True)
    fgroup = group[part_of]
    order = np.argsort(fgroup, kind="stable")
    flat, fgroup = flat[order], fgroup[order]
    types = shapely.get_type_id(flat)
    family = np.where(types == _POINT, 0, np.where(types == _LINESTRING, 1, 2))
    lo = np.full(n_groups, 9)
    hi = np.full(n_groups, -1)
    np.minimum.at(lo, fgroup, family)
    np.maximum.at(hi, fgroup, family)
    out = np.empty(n_groups, dtype=object)
    for fam, ctor in ((0, shapely.multipoints), (1, shapely.multilinestrings), (None, shapely.geometrycollections)):
        sel_groups = (lo == hi) & (lo == fam) if fam is not None else ~((lo == hi) & (lo < 2))
        sel = sel_groups[fgroup]
        if not sel.any():
            continue
        g = np.flatnonzero(sel_groups)
        _, idx = np.unique(fgroup[sel], return_inverse=True)
        out[g] = ctor(flat[sel], indices=idx.reshape(-1))
    return out


def _tags_array(tags: list) -> pa.MapArray:
    offsets = np.zeros(len(tags) + 1, np.int32)
    np.cumsum([len(t) for t in tags], out=offsets[1:])
    keys = [k for t in tags for k, _ in t]
    values = [v for t in tags for _, v in t]
    return pa.MapArray.from_arrays(pa.array(offsets), pa.array(keys, pa.string()), pa.array(values, pa.string()))


def tile_osm(data: OsmData, region: str, tile_size_m: float = TILE_SIZE_M, log=None) -> TiledRegion:
    """Project, repair, clip and describe every kept feature (see the module docstring)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    dropped, repaired = Counter(data.dropped), Counter(data.repaired)
    s = float(tile_size_m)
    n_nodes, n_ways, n_rel = data.n_nodes, data.n_ways, len(data.rel_id)
    n_ent = len(data)
    first_rel = n_nodes + n_ways

    minx, miny, maxx, maxy = data.lonlat_bounds()
    epsg = utm_epsg((minx + maxx) / 2.0, (miny + maxy) / 2.0)
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    node_xy = _project(data.node_lonlat, to_utm)
    way_xy = _project(data.way_coords, to_utm)
    timings["project"] = time.perf_counter() - t0

    pieces = _Pieces()
    # ---- nodes --------------------------------------------------------------------------
    t = time.perf_counter()
    cell = np.floor(node_xy / s).astype(np.int64)
    pieces.add(np.arange(n_nodes), cell[:, 0], cell[:, 1], shapely.points(node_xy - cell * s), np.zeros(n_nodes))

    # ---- lines: numpy cutter --------------------------------------------------------------
    counts = np.diff(data.way_offsets)
    line_ways = np.flatnonzero(~data.way_polygon)
    if len(line_ways):
        sel = np.repeat(~data.way_polygon, counts)
        line_offsets = np.concatenate([[0], np.cumsum(counts[line_ways])])
        line, tx, ty, geom, length = cut_lines(way_xy[sel], line_offsets, s)
        pieces.add(n_nodes + line_ways[line], tx, ty, geom, length)
    timings["cut_lines"] = time.perf_counter() - t

    # ---- polygons: area ways and multipolygon relations ------------------------------------
    t = time.perf_counter()
    poly_ways = np.flatnonzero(data.way_polygon)
    poly_owner = [n_nodes + poly_ways]
    poly_geoms = [np.empty(0, dtype=object)]
    if len(poly_ways):
        sel = np.repeat(data.way_polygon, counts)
        owner = np.repeat(np.arange(len(poly_ways)), counts[poly_ways])
        poly_geoms = [shapely.polygons(shapely.linearrings(way_xy[sel], indices=owner))]
    collect_rels = []  # relations whose pieces are their members' pieces
    mp_owner, mp_geoms = [], []
    for k in range(n_rel):
        if not data.rel_multipolygon[k]:
            collect_rels.append(k)
            continue
        outer, inner = [], []
        for m, role in data.rel_members[k]:
            if n_nodes <= m < first_rel:
                w = m - n_nodes
                (inner if role == "inner" else outer).append(way_xy[data.way_offsets[w]:data.way_offsets[w + 1]])
        geom = _assemble_multipolygon(outer, inner) if outer else None
        if geom is None:
            repaired["multipolygon_unclosed_as_lines"] += 1
            collect_rels.append(k)
        else:
            mp_owner.append(first_rel + k)
            mp_geoms.append(geom)
    poly_owner.append(np.asarray(mp_owner, np.int64))
    poly_geoms.append(np.asarray(mp_geoms, dtype=object))
    poly_owner = np.concatenate(poly_owner)
    poly_geoms = _repair(np.concatenate(poly_geoms), repaired)
    empty = shapely.is_empty(poly_geoms)
    dropped["empty_after_repair"] += int(empty.sum())
    poly_owner, poly_geoms = poly_owner[~empty], poly_geoms[~empty]
    if len(poly_geoms):
        idx, tx, ty, geom, _ = clip_to_grid(poly_geoms, s)
        coords, coord_owner = shapely.get_coordinates(geom, return_index=True)
        origin = np.stack([tx, ty], axis=1).astype(np.float64) * s
        local = shapely.set_coordinates(geom.copy(), coords - origin[coord_owner])
        pieces.add(poly_owner[idx], tx, ty, local)  # length: the perimeter, from GEOS
    timings["clip_polygons"] = time.perf_counter() - t

    # ---- other relations: their members' pieces, grouped per tile, members first -----------
    t = time.perf_counter()
    depth = np.zeros(n_rel, np.int64)
    for _ in range(16):  # longest member-relation chain we follow
        new = depth.copy()
        for k in collect_rels:
            sub = [depth[m - first_rel] + 1 for m, _ in data.rel_members[k] if m >= first_rel and m - first_rel != k]
            new[k] = max(sub, default=0)
        if (new == depth).all():
            break
        depth = new
    for level in sorted({int(depth[k]) for k in collect_rels}):
        rels = [k for k in collect_rels if depth[k] == level]
        pairs = np.unique(np.asarray([(first_rel + k, m) for k in rels for m, _ in data.rel_members[k] if m != first_rel + k],
                                     np.int64).reshape(-1, 2), axis=0)
        owner, ptx, pty, pgeom, _ = pieces.arrays()
        order = np.argsort(owner, kind="stable")
        sorted_owner = owner[order]
        lo = np.searchsorted(sorted_owner, pairs[:, 1], "left")
        hi = np.searchsorted(sorted_owner, pairs[:, 1], "right")
        n_each = hi - lo
        rep = np.repeat(np.arange(len(pairs)), n_each)
        pos = order[np.repeat(lo, n_each) + (np.arange(len(rep)) - np.repeat(np.cumsum(n_each) - n_each, n_each))]
        key = np.stack([pairs[rep, 0], ptx[pos], pty[pos]], axis=1)
        if len(key) == 0:
            continue
        uniq, group = np.unique(key, axis=0, return_inverse=True)
        group = group.reshape(-1)
        sort = np.argsort(group, kind="stable")
        geoms = _collect_by_group(pgeom[pos][sort], group[sort], len(uniq))
        pieces.add(uniq[:, 0], uniq[:, 1], uniq[:, 2], geoms)
    timings["relations"] = time.perf_counter() - t

    # ---- order: tiles by 16x16 block, row-major within; pieces by tile, type, id -----------
    t = time.perf_counter()
    owner, tx, ty, local, length = pieces.arrays()
    has_piece = np.zeros(n_ent, bool)
    has_piece[owner] = True
    no_piece = int(n_ent - has_piece.sum()) - int(empty.sum())
    dropped["no_tile_piece"] += no_piece
    osm_type, osm_id = data.osm_type, data.osm_id
    uniq, inverse = np.unique(np.stack([ty, tx], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    u_ty, u_tx = uniq[:, 0], uniq[:, 1]
    tile_order = np.lexsort((u_tx, u_ty, np.floor_divide(u_tx, BLOCK_TILES), np.floor_divide(u_ty, BLOCK_TILES)))
    rank = np.empty(len(uniq), np.int64)
    rank[tile_order] = np.arange(len(uniq))
    piece_tile = rank[inverse]
    order = np.lexsort((osm_id[owner], osm_type[owner], piece_tile))
    owner, tx, ty, local, length, piece_tile = owner[order], tx[order], ty[order], local[order], length[order], piece_tile[order]
    u_tx, u_ty = u_tx[tile_order], u_ty[tile_order]
    timings["order"] = time.perf_counter() - t

    # ---- describe: min boxes, measures ----------------------------------------------------
    t = time.perf_counter()
    zeros = np.zeros(len(local))
    minbox = minbox_corners(local, zeros, zeros, s)
    type_ids = shapely.get_type_id(local)
    area = shapely.area(local)
    need_len = np.isnan(length)
    length[need_len] = shapely.length(local[need_len])
    pieces_per_entity = np.bincount(owner, minlength=n_ent)
    timings["describe"] = time.perf_counter() - t

    # ---- area accounting for polygons wholly inside the extract ---------------------------
    complete = np.concatenate([np.ones(n_nodes, bool), data.way_complete, data.rel_complete])
    check = np.zeros(n_ent, bool)
    check[poly_owner] = complete[poly_owner]
    check &= has_piece
    orig_area = np.zeros(n_ent)
    orig_area[poly_owner] = shapely.area(poly_geoms)
    piece_area = np.bincount(owner, weights=np.where(check[owner], area, 0.0), minlength=n_ent)
    rel = np.abs(piece_area[check] - orig_area[check]) / np.maximum(orig_area[check], 1e-12)
    area_check = {
        "n_polygons_checked": int(check.sum()),
        "max_rel_error": float(rel.max()) if len(rel) else 0.0,
        "n_over_tolerance": int((rel > AREA_REL_TOL).sum()),
        "tolerance": AREA_REL_TOL,
    }

    # ---- Arrow tables ---------------------------------------------------------------------
    t = time.perf_counter()
    n_tiles = len(u_tx)
    tile_id = pa.array([f"{epsg}_{x}_{y}" for x, y in zip(u_tx.tolist(), u_ty.tolist())], pa.string())
    n_pieces = len(owner)
    entities_table = pa.table(
        {
            "tile_id": tile_id.take(pa.array(piece_tile)),
            "region": pa.array([region], pa.string()).take(pa.array(np.zeros(n_pieces, np.int64))),
            "osm_type": pa.array(OSM_TYPE_NAMES, pa.string()).take(pa.array(osm_type[owner].astype(np.int64))),
            "osm_id": pa.array(osm_id[owner], pa.int64()),
            "tags": _tags_array(data.tags).take(pa.array(owner)),
            "geom_type": pa.array(GEOMETRY_TYPE_NAMES, pa.string()).take(pa.array(type_ids.astype(np.int64))),
            "geometry": pa.array(shapely.to_wkb(local, output_dimension=2), pa.binary()),
            "minbox": pa.FixedSizeListArray.from_arrays(pa.array(minbox.reshape(-1), pa.float32()), 8),
            "area_m2": pa.array(area, pa.float64()),
            "length_m": pa.array(length, pa.float64()),
            "is_clipped": pa.array(pieces_per_entity[owner] > 1, pa.bool_()),
            "entity_complete": pa.array(complete[owner], pa.bool_()),
        },
        schema=ENTITIES_SCHEMA,
    )
    per_type = np.zeros((n_tiles, 3), np.int64)
    np.add.at(per_type, (piece_tile, osm_type[owner].astype(np.int64)), 1)
    to_lonlat = Transformer.from_crs(epsg, 4326, always_xy=True)
    lon, lat = to_lonlat.transform((u_tx + 0.5) * s, (u_ty + 0.5) * s)
    tiles_table = pa.table(
        {
            "tile_id": tile_id,
            "region": pa.array([region] * n_tiles, pa.string()),
            "epsg": pa.array(np.full(n_tiles, epsg), pa.int32()),
            "tile_x": pa.array(u_tx, pa.int32()),
            "tile_y": pa.array(u_ty, pa.int32()),
            "x_min_m": pa.array(u_tx * s, pa.float64()),
            "y_min_m": pa.array(u_ty * s, pa.float64()),
            "tile_size_m": pa.array(np.full(n_tiles, s), pa.float32()),
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
        epsg=epsg, tiles=tiles_table, entities=entities_table, n_input=data.n_input,
        n_entities_kept=int(has_piece.sum()), dropped=dropped, repaired=repaired,
        area_check=area_check, timings_s=timings,
    )
    if log:
        log(f"tiled {region}: EPSG:{epsg}, {n_tiles:,} tiles, {n_pieces:,} pieces of {result.n_entities_kept:,} entities")
    return result
