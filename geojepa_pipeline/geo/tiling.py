"""OSM features -> 300 m tile tables (tiles + entity pieces), ready to shard.

``tile_osm(data)`` projects the features to their UTM zone and cuts them into one piece
per (entity, tile):

* nodes: the half-open cell holding the point;
* lines (ways that are not areas): cut at the grid lines in numpy (``grid.cut_lines``); a way
  left with one located vertex (a line of one repeated point, invalid for GEOS) is that point;
* polygons (area ways and ``type=multipolygon`` relations): repaired with ``make_valid``
  where invalid, then clipped to the cells by GEOS (``grid.clip_to_grid``);
* every other relation: the union, per tile, of its members' pieces (members first), so a
  route or a boundary is exactly the set of its ways' pieces.

Every piece gets its minimum rotated box (4 corners in tile units), tile-local WKB and its
geometry type.

Order (deterministic, spatially blocked): tiles sorted by 16x16-tile blocks (4.8 km squares
at 300 m), block columns west to east, blocks south to north within a column, tiles row-major
inside a block; pieces by tile, then OSM type and id.

Work is split into *bands* of whole block columns. A band handles every entity whose cell
range reaches it and keeps only the pieces inside it, so bands are independent: memory is
bounded by the largest band, and bands run on ``workers`` forked processes. Concatenating
bands west to east gives the global order.

Every kept feature appears in at least one tile, or is counted under ``dropped``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer

from .clip import tiles_touching
from .grid import TILE_SIZE_M, clip_to_grid, cut_lines, dense_key, ranges, tile_ids, unique_ints, utm_epsg
from .osm_read import OSM_TYPE_NAMES, OsmData
from .minbox import minbox_from_coords
from .minbox import warm_up as load_minbox_kernel
from .wkb import warm_up as load_wkb_kernel
from .wkb import wkb_array
from .parallel import default_workers, fork_worker_init, gc_paused

SCHEMA_VERSION = 1
BLOCK_TILES = 16  # tiles per side of a sort block
AREA_REL_TOL = 1e-6
BAND_ENTITIES = 25_000  # target entities per band: bounds memory, balances 2 workers

GEOMETRY_TYPE_NAMES = (
    "Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon", "GeometryCollection",
)
_POINT, _LINESTRING = 0, 1
KEPT, OUTSIDE_CLIP, EMPTY, NO_PIECE, ELSEWHERE = range(5)  # what became of an entity in a block (``outcomes``)
_BAND_REPAIRS = ("make_valid", "multipolygon_unclosed_as_lines", "zero_length_line_as_point")  # entities repaired while tiling

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
    ("length_m", pa.float64()),  # lines: length; polygons: perimeter
    ("is_clipped", pa.bool_()),  # the entity is split over several tiles
    ("entity_complete", pa.bool_()),  # all the entity's nodes/members lie in the extract
])


@dataclass
class TiledRegion:
    """Result of ``tile_osm``: whole-region tables plus accounting.

    With a ``spill_dir`` the entity pieces stay in one Arrow IPC file per band and
    ``entities`` is None; ``entity_chunks()`` yields them band by band either way.
    """

    epsg: int
    tiles: pa.Table  # TILES_SCHEMA, one row per non-empty tile
    entities: pa.Table | None  # ENTITIES_SCHEMA, one row per (entity, tile) piece (None when spilled)
    n_input: int  # features accounted for by the reader
    n_entities_kept: int  # distinct entities with at least one piece
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    area_check: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    n_bands: int = 1
    n_pieces: int = 0
    band_files: list = field(default_factory=list)  # spilled bands: (ipc path, n_tiles, is_clipped (M,) bool)
    outcomes: dict | None = None  # block mode (``block=``): per entity of the data, by (osm type, osm id)

    def entity_chunks(self):
        """(tiles, entities) tables of consecutive tiles, in the global order."""
        if self.entities is not None:
            yield self.tiles, self.entities
            return
        for i in range(len(self.band_files)):
            yield self.band_chunk(i)

    def band_starts(self) -> np.ndarray:
        """(n_bands + 1,) the first tile of each spilled band, then the number of tiles."""
        return np.concatenate([[0], np.cumsum([n for _, n, _ in self.band_files])]).astype(np.int64)

    def band_chunk(self, i: int) -> tuple[pa.Table, pa.Table]:
        """(tiles, entities) of spilled band ``i``; the entities are memory-mapped, so drop them when done."""
        path, n_tiles, clipped = self.band_files[i]
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        col = table.schema.get_field_index("is_clipped")
        table = table.set_column(col, ENTITIES_SCHEMA.field("is_clipped"), pa.array(clipped, pa.bool_()))
        return self.tiles.slice(int(self.band_starts()[i]), n_tiles), table

    def accounting(self) -> dict:
        """Counts that must add up: ``n_input == n_entities_kept + sum(dropped)``."""
        return {
            "n_input": self.n_input,
            "n_entities_kept": self.n_entities_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "balanced": self.n_input == self.n_entities_kept + sum(self.dropped.values()),
        }


# ---- shared, read-only inputs of every band -------------------------------------------------
@dataclass
class _Region:
    """Projected inputs, computed once before the bands run (forked workers inherit it)."""

    data: OsmData
    region: str
    epsg: int
    s: float
    node_xy: np.ndarray  # (Nn, 2) metres
    node_cell: np.ndarray  # (Nn, 2) int64
    way_xy: np.ndarray  # (C, 2) metres
    way_cx: np.ndarray  # (Nw, 2) int64 min/max cell column of each way
    rel_cx: np.ndarray  # (Nr, 2) int64 min/max cell column reached by each relation's members
    rel_depth: np.ndarray  # (Nr,) member-relation nesting depth (members first)
    osm_type: np.ndarray  # (N,) int8
    osm_id: np.ndarray  # (N,) int64
    complete: np.ndarray  # (N,) bool
    rel_member_offsets: np.ndarray  # (Nr + 1,) relation k's members are rel_member[offsets[k]:offsets[k + 1]]
    rel_member: np.ndarray  # (M,) entity index of every relation member, in member order
    clip_utm: object = None  # shapely polygon in metres: only tiles touching it are kept (None: every tile)
    block: tuple | None = None  # (tx0, tx1, ty0, ty1): only tiles tx0 <= tx < tx1, ty0 <= ty < ty1 are kept

    @property
    def first_rel(self) -> int:
        return self.data.n_nodes + self.data.n_ways


def _project(lonlat: np.ndarray, transformer: Transformer) -> np.ndarray:
    """(P, 2) lon/lat degrees -> (P, 2) metres."""
    if len(lonlat) == 0:
        return np.zeros((0, 2))
    x, y = transformer.transform(lonlat[:, 0], lonlat[:, 1])
    return np.column_stack([x, y])


def _prepare(data: OsmData, region: str, s: float, clip=None, epsg: int | None = None, block=None) -> _Region:
    if epsg is None and clip is not None:
        epsg = clip.epsg
    elif epsg is None:  # the UTM zone of the kept entities' centre
        minx, miny, maxx, maxy = data.lonlat_bounds()
        epsg = utm_epsg((minx + maxx) / 2.0, (miny + maxy) / 2.0)
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    node_xy = _project(data.node_lonlat, to_utm)
    way_xy = _project(data.way_coords, to_utm)
    node_cell = np.floor(node_xy / s).astype(np.int64)
    n_nodes, n_ways, n_rel = data.n_nodes, data.n_ways, len(data.rel_id)
    if n_ways:
        starts = data.way_offsets[:-1]
        cx = np.floor(way_xy[:, 0] / s).astype(np.int64)
        way_cx = np.stack([np.minimum.reduceat(cx, starts), np.maximum.reduceat(cx, starts)], axis=1)
    else:
        way_cx = np.zeros((0, 2), np.int64)
    # relations reach the union of their members' columns; depth orders members first
    first_rel = n_nodes + n_ways
    ent_cx = np.concatenate([np.repeat(node_cell[:, :1], 2, axis=1), way_cx, np.zeros((n_rel, 2), np.int64)])
    ent_cx[first_rel:, 0], ent_cx[first_rel:, 1] = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    rel_depth = np.zeros(n_rel, np.int64)
    n_members = np.fromiter((len(members) for members in data.rel_members), np.int64, n_rel)
    member = np.fromiter((m for members in data.rel_members for m, _ in members), np.int64, int(n_members.sum()))
    owner = np.repeat(np.arange(n_rel), n_members)
    sub = (member >= first_rel) & (member != first_rel + owner)  # member relations (not the relation itself)
    sub_owner, sub_rel = owner[sub], member[sub] - first_rel
    has = np.flatnonzero(n_members > 0)
    starts = (np.cumsum(n_members) - n_members)[has]
    for _ in range(16):  # all relations at once per pass: the longest member-relation chain followed; cycles stop here
        cx = ent_cx[member]
        lo, hi = ent_cx[first_rel:, 0].copy(), ent_cx[first_rel:, 1].copy()
        if len(has):
            lo[has] = np.minimum(lo[has], np.minimum.reduceat(cx[:, 0], starts))
            hi[has] = np.maximum(hi[has], np.maximum.reduceat(cx[:, 1], starts))
        depth = np.zeros(n_rel, np.int64)
        np.maximum.at(depth, sub_owner, rel_depth[sub_rel] + 1)
        changed = (lo != ent_cx[first_rel:, 0]) | (hi != ent_cx[first_rel:, 1]) | (depth != rel_depth)
        if not changed.any():
            break
        ent_cx[first_rel:, 0], ent_cx[first_rel:, 1], rel_depth = lo, hi, depth
    complete = np.concatenate([np.ones(n_nodes, bool), data.way_complete, data.rel_complete])
    member_offsets = np.zeros(n_rel + 1, np.int64)
    np.cumsum(n_members, out=member_offsets[1:])
    return _Region(data, region, epsg, s, node_xy, node_cell, way_xy, way_cx, ent_cx[first_rel:], rel_depth,
                   data.osm_type, data.osm_id, complete, member_offsets, member,
                   clip.projected(epsg) if clip is not None else None, block)


# ---- one band ---------------------------------------------------------------------------------
@dataclass
class _Pieces:
    """Accumulates pieces: owner entity, tile indices, geometry (UTM metres), length (NaN: ask GEOS)."""

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


@dataclass
class _BandResult:
    entities: pa.Table | None  # ENTITIES_SCHEMA, ordered (is_clipped fixed after the merge); None if spilled
    spill_path: str | None  # where the entities went instead
    owner: np.ndarray  # (M,) entity index of each row
    area: np.ndarray  # (M,) piece area, m^2
    tiles: pa.Table  # TILES_SCHEMA, ordered
    poly_idx: np.ndarray  # polygon entities seen in this band
    poly_area: np.ndarray  # their whole (repaired) area, m^2
    repaired: dict  # reason -> entity indices
    empty: np.ndarray  # polygon entities empty after repair
    timings: dict
    outside_owner: np.ndarray  # (K,) entity of each piece left out (another block's tile, or one off the clip area)
    outside_area: np.ndarray  # (K,) its area, m^2 (the clipped-area check counts the whole polygon)
    outside_clip_owner: np.ndarray  # entity of each piece in this block's tiles that does not touch the clip area


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
    uniform = lo == hi
    for sel_groups, ctor in ((uniform & (lo == 0), shapely.multipoints), (uniform & (lo == 1), shapely.multilinestrings),
                             (~(uniform & (lo < 2)), shapely.geometrycollections)):
        sel = sel_groups[fgroup]
        if sel.any():
            _, idx = np.unique(fgroup[sel], return_inverse=True)
            out[np.flatnonzero(sel_groups)] = ctor(flat[sel], indices=idx.reshape(-1))
    return out


def _repair(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_valid on invalid polygons (keeping only their polygonal structure); returns (geoms, fixed mask)."""
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    return geoms, invalid


def _node_pieces(R: _Region, pieces: "_Pieces", in_band) -> None:
    """One point piece per node in the band."""
    nodes = np.flatnonzero(in_band(R.node_cell[:, 0], R.node_cell[:, 0]))
    cell = R.node_cell[nodes]
    pieces.add(nodes, cell[:, 0], cell[:, 1], shapely.points(R.node_xy[nodes]), np.zeros(len(nodes)))


def _line_pieces(R: _Region, pieces: "_Pieces", in_band, x0: int, x1: int, ways_here: np.ndarray,
                 repaired: dict) -> None:
    """Lines through the numpy cutter: whole lines are cut, the pieces inside the band kept; zero-length ones are points."""
    data = R.data
    counts = np.diff(data.way_offsets)
    line_ways = np.flatnonzero(ways_here & ~data.way_polygon)
    if len(line_ways):
        idx = ranges(data.way_offsets, line_ways)
        line_offsets = np.concatenate([[0], np.cumsum(counts[line_ways])])
        line, tx, ty, geom, length = cut_lines(R.way_xy[idx], line_offsets, R.s, tile_local=False)
        keep = (tx >= x0) & (tx < x1)
        line, tx, ty, geom, length = line[keep], tx[keep], ty[keep], geom[keep], length[keep]
        # a way with one located vertex (the others outside the extract) is a line of one repeated
        # point, which GEOS calls invalid ("too few points"): it becomes the point it is
        zero = np.flatnonzero(length == 0)
        if len(zero):
            geom[zero] = shapely.points(shapely.get_coordinates(geom[zero])[np.cumsum(shapely.get_num_coordinates(geom[zero])) - 1])
            repaired["zero_length_line_as_point"].extend((data.n_nodes + line_ways[line[zero]]).tolist())
        pieces.add(data.n_nodes + line_ways[line], tx, ty, geom, length)


@dataclass
class _Polygons:
    owner: np.ndarray  # (P,) entity index of each non-empty polygon (area ways, then multipolygons)
    geoms: np.ndarray  # (P,) the repaired polygons, UTM metres
    empty: np.ndarray  # entity indices whose polygon was empty after repair
    collect_rels: np.ndarray  # relations in the band whose pieces are their members' (not assembled as areas)


def _polygon_pieces(R: _Region, pieces: "_Pieces", in_band, x0: int, x1: int, ways_here: np.ndarray,
                    repaired: dict) -> _Polygons:
    """Area ways and multipolygon relations, assembled, repaired and clipped to the band's tiles."""
    data, n_nodes, first_rel = R.data, R.data.n_nodes, R.first_rel
    counts = np.diff(data.way_offsets)
    poly_ways = np.flatnonzero(ways_here & data.way_polygon)
    poly_owner = [n_nodes + poly_ways]
    poly_geoms = [np.empty(0, dtype=object)]
    if len(poly_ways):
        owner = np.repeat(np.arange(len(poly_ways)), counts[poly_ways])
        poly_geoms = [shapely.polygons(shapely.linearrings(R.way_xy[ranges(data.way_offsets, poly_ways)], indices=owner))]
    rels_here = np.flatnonzero(in_band(R.rel_cx[:, 0], R.rel_cx[:, 1]))
    collect_rels, mp_owner, mp_geoms = [], [], []
    for k in rels_here.tolist():
        if not data.rel_multipolygon[k]:
            collect_rels.append(k)
            continue
        outer, inner = [], []
        for m, role in data.rel_members[k]:
            if n_nodes <= m < first_rel:
                w = m - n_nodes
                (inner if role == "inner" else outer).append(R.way_xy[data.way_offsets[w]:data.way_offsets[w + 1]])
        geom = _assemble_multipolygon(outer, inner) if outer else None
        if geom is None:
            repaired["multipolygon_unclosed_as_lines"].append(first_rel + k)
            collect_rels.append(k)
        else:
            mp_owner.append(first_rel + k)
            mp_geoms.append(geom)
    poly_owner = np.concatenate(poly_owner + [np.asarray(mp_owner, np.int64)])
    poly_geoms, fixed = _repair(np.concatenate(poly_geoms + [np.asarray(mp_geoms, dtype=object)]))
    repaired["make_valid"] = poly_owner[fixed]
    empty = shapely.is_empty(poly_geoms)
    empty_idx = poly_owner[empty]
    poly_owner, poly_geoms = poly_owner[~empty], poly_geoms[~empty]
    if len(poly_geoms):
        idx, tx, ty, geom, _ = clip_to_grid(poly_geoms, R.s, x_range=(x0, x1))
        pieces.add(poly_owner[idx], tx, ty, geom)  # length: the perimeter, from GEOS
    return _Polygons(poly_owner, poly_geoms, empty_idx, np.asarray(collect_rels, np.int64))


def _relation_pieces(R: _Region, pieces: "_Pieces", collect_rels: np.ndarray) -> None:
    """Other relations: their members' pieces, grouped per tile, members (deeper levels) first."""
    first_rel = R.first_rel
    for level in unique_ints(R.rel_depth[collect_rels]).tolist():
        rels = collect_rels[R.rel_depth[collect_rels] == level]
        n_members = R.rel_member_offsets[rels + 1] - R.rel_member_offsets[rels]
        pairs = np.stack([first_rel + np.repeat(rels, n_members), R.rel_member[ranges(R.rel_member_offsets, rels)]], axis=1)
        pairs = pairs[pairs[:, 1] != pairs[:, 0]]  # a relation listing itself
        pairs = pairs[np.unique(pairs[:, 0] * (R.osm_id.size + 1) + pairs[:, 1], return_index=True)[1]]
        owner, ptx, pty, pgeom, _ = pieces.arrays()
        order = np.argsort(owner, kind="stable")
        sorted_owner = owner[order]
        lo = np.searchsorted(sorted_owner, pairs[:, 1], "left")
        n_each = np.searchsorted(sorted_owner, pairs[:, 1], "right") - lo
        if n_each.sum() == 0:
            continue
        rep = np.repeat(np.arange(len(pairs)), n_each)
        pos = order[np.repeat(lo, n_each) + (np.arange(len(rep)) - np.repeat(np.cumsum(n_each) - n_each, n_each))]
        key = dense_key(pairs[rep, 0], ptx[pos], pty[pos])
        uniq_key, first, group = np.unique(key, return_index=True, return_inverse=True)
        group = group.reshape(-1)
        sort = np.argsort(group, kind="stable")
        geoms = _collect_by_group(pgeom[pos][sort], group[sort], len(uniq_key))
        pieces.add(pairs[rep[first], 0], ptx[pos][first], pty[pos][first], geoms)


def _filter_pieces(R: _Region, pieces: "_Pieces") -> tuple["_Pieces", np.ndarray, np.ndarray, np.ndarray]:
    """(the pieces in the block's tiles that touch the clip area; owner and area of the others; owner of those
    in the block's tiles off the clip area). Without a clip or a block: every piece, nothing left out."""
    empty = np.zeros(0, np.int64)
    if R.clip_utm is None and R.block is None:
        return pieces, empty, np.zeros(0), empty
    owner, tx, ty, geom, length = pieces.arrays()
    in_block = np.ones(len(owner), bool)
    if R.block is not None:
        tx0, tx1, ty0, ty1 = R.block
        in_block = (tx >= tx0) & (tx < tx1) & (ty >= ty0) & (ty < ty1)
    keep = in_block.copy()
    if R.clip_utm is not None:
        keep[in_block] = tiles_touching(R.clip_utm, tx[in_block], ty[in_block], R.s)
    kept = _Pieces()
    kept.add(owner[keep], tx[keep], ty[keep], geom[keep], length[keep])
    return kept, owner[~keep], shapely.area(geom[~keep]), owner[in_block & ~keep]


def _ordered_pieces(R: _Region, pieces: "_Pieces"):
    """The pieces in shard order (block column, block row, row-major in the block; then type, id):
    (owner, tx, ty, geom, length, tile_start (first piece of each tile), piece_tile (tile of each piece))."""
    owner, tx, ty, geom, length = pieces.arrays()
    tile_key = dense_key(tx // BLOCK_TILES, ty // BLOCK_TILES, ty % BLOCK_TILES, tx % BLOCK_TILES)
    order = np.lexsort((R.osm_id[owner], R.osm_type[owner], tile_key))
    owner, tx, ty, geom, length, tile_key = owner[order], tx[order], ty[order], geom[order], length[order], tile_key[order]
    tile_start = np.flatnonzero(np.concatenate([[True], tile_key[1:] != tile_key[:-1]])) if len(tile_key) else np.zeros(0, np.int64)
    piece_tile = np.cumsum(np.concatenate([[False], tile_key[1:] != tile_key[:-1]])) if len(tile_key) else np.zeros(0, np.int64)
    return owner, tx, ty, geom, length, tile_start, piece_tile


def _describe(geom: np.ndarray, tx: np.ndarray, ty: np.ndarray, length: np.ndarray, s: float):
    """(WKB in tile-local metres, min-box corners (P, 8), GEOS type ids, area m², length m) of the pieces.

    Pieces are in UTM metres up to here; only their coordinates move to the tile frame (x - tx * s is
    exact for x in the tile, so this equals translating the geometries). ``length`` is filled in place
    where NaN (the perimeter or line length, from GEOS)."""
    xy = shapely.get_coordinates(geom)  # (V, 2)
    xy_counts = shapely.get_num_coordinates(geom).astype(np.int64)
    xy -= np.repeat(np.stack([tx, ty], axis=1).astype(np.float64) * s, xy_counts, axis=0)  # tile-local
    zeros = np.zeros(len(geom))
    corners = minbox_from_coords(xy, xy_counts, zeros, zeros, s)
    type_ids = shapely.get_type_id(geom)
    area = shapely.area(geom)
    need_len = np.isnan(length)
    length[need_len] = shapely.length(geom[need_len])
    return wkb_array(geom, type_ids, xy, xy_counts), corners, type_ids, area, length


def _entities_table(R: _Region, tile_id: pa.Array, piece_tile, owner, wkb, corners, type_ids, area, length) -> pa.Table:
    """``ENTITIES_SCHEMA``: one row per piece, in shard order."""
    n_pieces = len(owner)
    return pa.table(
        {
            "tile_id": tile_id.take(pa.array(piece_tile)),
            "region": pa.array([R.region], pa.string()).take(pa.array(np.zeros(n_pieces, np.int64))),
            "osm_type": pa.array(OSM_TYPE_NAMES, pa.string()).take(pa.array(R.osm_type[owner].astype(np.int64))),
            "osm_id": pa.array(R.osm_id[owner], pa.int64()),
            "tags": R.data.tags.take(pa.array(owner)),
            "geom_type": pa.array(GEOMETRY_TYPE_NAMES, pa.string()).take(pa.array(type_ids.astype(np.int64))),
            "geometry": wkb,
            "minbox": pa.FixedSizeListArray.from_arrays(pa.array(corners.reshape(-1), pa.float32()), 8),
            "area_m2": pa.array(area, pa.float64()),
            "length_m": pa.array(length, pa.float64()),
            "is_clipped": pa.array(np.zeros(n_pieces, bool), pa.bool_()),
            "entity_complete": pa.array(R.complete[owner], pa.bool_()),
        },
        schema=ENTITIES_SCHEMA,
    )


def _tiles_table(R: _Region, tile_id: pa.Array, u_tx, u_ty, piece_tile, owner) -> pa.Table:
    """``TILES_SCHEMA``: one row per tile with pieces, with its centre in lon/lat and its piece counts per type."""
    s = R.s
    n_tiles = len(u_tx)
    per_type = np.zeros((n_tiles, 3), np.int64)
    np.add.at(per_type, (piece_tile, R.osm_type[owner].astype(np.int64)), 1)
    to_lonlat = Transformer.from_crs(R.epsg, 4326, always_xy=True)
    lon, lat = to_lonlat.transform((u_tx + 0.5) * s, (u_ty + 0.5) * s)
    return pa.table(
        {
            "tile_id": tile_id,
            "region": pa.array([R.region] * n_tiles, pa.string()),
            "epsg": pa.array(np.full(n_tiles, R.epsg), pa.int32()),
            "tile_x": pa.array(u_tx, pa.int32()),
            "tile_y": pa.array(u_ty, pa.int32()),
            "x_min_m": pa.array(u_tx * s, pa.float64()),
            "y_min_m": pa.array(u_ty * s, pa.float64()),
            "tile_size_m": pa.array(np.full(n_tiles, s), pa.float32()),
            "lon": pa.array(np.asarray(lon, np.float64).reshape(-1), pa.float64()),
            "lat": pa.array(np.asarray(lat, np.float64).reshape(-1), pa.float64()),
            "n_entities": pa.array(per_type.sum(axis=1), pa.int32()),
            "n_nodes": pa.array(per_type[:, 0], pa.int32()),
            "n_ways": pa.array(per_type[:, 1], pa.int32()),
            "n_relations": pa.array(per_type[:, 2], pa.int32()),
        },
        schema=TILES_SCHEMA,
    )


def _spill(entities: pa.Table, spill_dir: Path, band_index: int) -> str:
    """Write the band's pieces to an Arrow IPC file in ``spill_dir``; returns its path."""
    spill_path = str(spill_dir / f"band-{band_index:05d}.arrow")
    with pa.OSFile(spill_path, "wb") as sink, pa.ipc.new_file(sink, ENTITIES_SCHEMA) as writer:
        writer.write_table(entities, max_chunksize=65536)
    return spill_path


def _tile_band(R: _Region, x0: int, x1: int, band_index: int = 0, spill_dir: Path | None = None) -> _BandResult:
    """Every piece with ``x0 <= tile_x < x1``; with ``spill_dir`` the pieces go to an Arrow IPC file."""
    timings: dict[str, float] = {}
    repaired: dict[str, list] = {reason: [] for reason in _BAND_REPAIRS}
    pieces = _Pieces()
    in_band = lambda lo, hi: (hi >= x0) & (lo < x1)  # noqa: E731
    ways_here = in_band(R.way_cx[:, 0], R.way_cx[:, 1])

    t = time.perf_counter()
    _node_pieces(R, pieces, in_band)
    _line_pieces(R, pieces, in_band, x0, x1, ways_here, repaired)
    timings["cut_lines"] = time.perf_counter() - t
    t = time.perf_counter()
    polygons = _polygon_pieces(R, pieces, in_band, x0, x1, ways_here, repaired)
    timings["clip_polygons"] = time.perf_counter() - t
    t = time.perf_counter()
    _relation_pieces(R, pieces, polygons.collect_rels)
    timings["relations"] = time.perf_counter() - t
    pieces, outside_owner, outside_area, outside_clip_owner = _filter_pieces(R, pieces)
    t = time.perf_counter()
    owner, tx, ty, geom, length, tile_start, piece_tile = _ordered_pieces(R, pieces)
    timings["order"] = time.perf_counter() - t
    t = time.perf_counter()
    wkb, corners, type_ids, area, length = _describe(geom, tx, ty, length, R.s)
    del geom
    timings["describe"] = time.perf_counter() - t
    t = time.perf_counter()
    u_tx, u_ty = tx[tile_start], ty[tile_start]
    tile_id = pa.array(tile_ids(R.epsg, u_tx, u_ty), pa.string())
    entities = _entities_table(R, tile_id, piece_tile, owner, wkb, corners, type_ids, area, length)
    tiles = _tiles_table(R, tile_id, u_tx, u_ty, piece_tile, owner)
    timings["tables"] = time.perf_counter() - t
    spill_path = None
    if spill_dir is not None:
        t = time.perf_counter()
        spill_path, entities = _spill(entities, spill_dir, band_index), None
        timings["spill"] = time.perf_counter() - t
    return _BandResult(entities, spill_path, owner, area, tiles, polygons.owner, shapely.area(polygons.geoms),
                       {k: np.asarray(v, np.int64) for k, v in repaired.items()}, polygons.empty, timings,
                       outside_owner, outside_area, outside_clip_owner)


# ---- bands and workers ------------------------------------------------------------------------
_SHARED: _Region | None = None  # set before forking; workers read it


def _band_worker(job: tuple) -> _BandResult:
    return _tile_band(_SHARED, *job)


def _bands(R: _Region, band_entities: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Cell-column ranges of whole 16-tile block columns, ~``band_entities`` entities each on average.

    Returns the ranges and each band's estimated cost. The cuts balance the cost, not the
    entity count: a node weighs 1, a way its vertex count (time per band followed the
    vertices with r = 0.99 on the 8x8 Liechtenstein, the entity count much less so).
    """
    rel_lo = R.rel_cx[:, 0][R.rel_cx[:, 0] <= R.rel_cx[:, 1]]  # relations that reach some column
    anchors = np.concatenate([R.node_cell[:, 0], R.way_cx[:, 0], rel_lo]) // BLOCK_TILES
    if len(anchors) == 0:
        return [], np.zeros(0)
    weight = np.concatenate([np.ones(len(R.node_cell)), np.diff(R.data.way_offsets).astype(np.float64), np.ones(len(rel_lo))])
    cols, col_of = np.unique(anchors, return_inverse=True)
    col_weight = np.bincount(col_of.reshape(-1), weights=weight, minlength=len(cols))
    n_bands = max(1, int(np.ceil(len(anchors) / band_entities)))
    target = np.cumsum(col_weight) / col_weight.sum() * n_bands
    band_of_col = np.minimum(np.floor(target - 1e-9).astype(np.int64), n_bands - 1)
    bands, cost = [], []
    for b in unique_ints(band_of_col):
        c = cols[band_of_col == b]
        bands.append([int(c.min()), int(c.max()) + 1])
        cost.append(float(col_weight[band_of_col == b].sum()))
    # extend to cover every column (entities reach past their anchor column)
    reach_lo = min(int(R.node_cell[:, 0].min(initial=10**12)), int(R.way_cx[:, 0].min(initial=10**12)))
    reach_hi = max(int(R.node_cell[:, 0].max(initial=-10**12)), int(R.way_cx[:, 1].max(initial=-10**12)))
    bands[0][0] = min(bands[0][0], reach_lo // BLOCK_TILES)
    bands[-1][1] = max(bands[-1][1], reach_hi // BLOCK_TILES + 1)
    for a, b in zip(bands, bands[1:]):
        a[1] = b[0]
    return [(lo * BLOCK_TILES, hi * BLOCK_TILES) for lo, hi in bands], np.asarray(cost)


@gc_paused()  # forked band workers inherit the paused collector
def tile_osm(
    data: OsmData, region: str, tile_size_m: float = TILE_SIZE_M, log=None,
    workers: int | None = None, band_entities: int = BAND_ENTITIES, spill_dir: Path | None = None, clip=None,
    epsg: int | None = None, block: tuple[int, int, int, int] | None = None,
) -> TiledRegion:
    """Project, repair, clip and describe every kept feature (see the module docstring).

    ``spill_dir``: write each band's pieces there (Arrow IPC) instead of returning them in
    memory; ``TiledRegion.entity_chunks()`` reads them back one band at a time. ``clip``: a
    ``clip.ClipArea``; only the tiles touching it are kept, in its centre's UTM zone (``data``:
    what ``clip.clip_osm`` kept). Entities whose pieces all lie in other tiles are dropped as
    ``outside_clip``; ``is_clipped`` and the area check count every piece of an entity.

    ``epsg``: the grid's UTM zone (default: the clip's, else the data's centre). ``block``: (tx0, tx1,
    ty0, ty1), keep only those tiles; ``data`` is then one spatial block's share of a file
    (``geo.blocks``), and ``TiledRegion.outcomes`` says what became of each of its entities, by id.
    """
    global _SHARED
    t0 = time.perf_counter()
    if len(data) == 0:
        raise ValueError("the extract holds no tagged features to tile")
    R = _prepare(data, region, float(tile_size_m), clip, epsg, block)
    bands, band_cost = _bands(R, band_entities)
    # loaded once here (numba's first call in a process: ~0.25 s, mostly its type registries;
    # a loader thread during _prepare hid that but raised peak RSS by ~110 MiB), so the
    # forked workers inherit the compiled kernels
    load_minbox_kernel()
    load_wkb_kernel()
    if spill_dir is not None:
        spill_dir = Path(spill_dir)
        spill_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(x0, x1, i, spill_dir) for i, (x0, x1) in enumerate(bands)]
    timings: dict[str, float] = {"prepare": time.perf_counter() - t0}
    workers = default_workers() if workers is None else max(1, workers)
    use_pool = workers > 1 and len(bands) > 1 and "fork" in multiprocessing.get_all_start_methods()
    if log:
        log(f"tiling {region}: {len(data):,} entities in {len(bands)} band(s) on {workers if use_pool else 1} process(es)")
    results: list[_BandResult] = []
    if use_pool:
        _SHARED = R
        # costliest bands first, so that the last ones to finish are short (no long tail on one worker)
        by_cost = np.argsort(-band_cost, kind="stable")
        done: dict[int, _BandResult] = {}
        try:
            with multiprocessing.get_context("fork").Pool(min(workers, len(bands)), initializer=fork_worker_init) as pool:
                for i, res in zip(by_cost.tolist(), pool.imap(_band_worker, [jobs[i] for i in by_cost])):
                    done[i] = res
                    if log:
                        log(f"tiling {region}: {len(done)}/{len(bands)} bands done ({len(res.owner):,} pieces in band {i + 1})")
                pool.close()
                pool.join()
        finally:
            _SHARED = None
        results = [done[i] for i in range(len(bands))]
    else:
        for i, job in enumerate(jobs):
            results.append(_tile_band(R, *job))
            if log and len(bands) > 1:
                log(f"tiling {region}: band {i + 1}/{len(bands)} done ({len(results[-1].owner):,} pieces)")
    for r in results:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v  # summed over bands (CPU seconds when parallel)

    # ---- merge -----------------------------------------------------------------------------
    t = time.perf_counter()
    n_ent = len(data)
    owner = np.concatenate([r.owner for r in results]) if results else np.zeros(0, np.int64)
    outside_owner = np.concatenate([r.outside_owner for r in results]) if results else np.zeros(0, np.int64)
    n_outside = np.bincount(outside_owner, minlength=n_ent)
    pieces_per_entity = np.bincount(owner, minlength=n_ent) + n_outside  # is_clipped: over all the entity's tiles
    tiles = pa.concat_tables([r.tiles for r in results]) if results else TILES_SCHEMA.empty_table()
    entities, band_files = None, []
    if spill_dir is None:
        entities = pa.concat_tables([r.entities for r in results]) if results else ENTITIES_SCHEMA.empty_table()
        entities = entities.set_column(entities.schema.get_field_index("is_clipped"), ENTITIES_SCHEMA.field("is_clipped"),
                                       pa.array(pieces_per_entity[owner] > 1, pa.bool_()))
    else:
        band_files = [(r.spill_path, r.tiles.num_rows, pieces_per_entity[r.owner] > 1) for r in results]
    has_piece = pieces_per_entity - n_outside > 0
    dropped, repaired = Counter(data.dropped), Counter(data.repaired)
    empty = unique_ints(np.concatenate([r.empty for r in results])) if results else np.zeros(0, np.int64)
    dropped["empty_after_repair"] += len(empty)
    outside_clip_owner = np.concatenate([r.outside_clip_owner for r in results]) if results else np.zeros(0, np.int64)
    off_clip = (np.bincount(outside_clip_owner, minlength=n_ent) > 0) & ~has_piece
    if clip is not None:
        dropped["outside_clip"] += int(off_clip.sum())
    elsewhere = (n_outside > 0) & ~has_piece & ~off_clip  # pieces only in other blocks' tiles
    dropped["no_tile_piece"] += int(n_ent - has_piece.sum()) - len(empty) - int(off_clip.sum()) - int(elsewhere.sum())
    for reason in _BAND_REPAIRS:
        n = len(unique_ints(np.concatenate([r.repaired[reason] for r in results]))) if results else 0
        if n:
            repaired[reason] += n

    # area accounting for polygons wholly inside the extract
    area_col = np.concatenate([r.area for r in results]) if results else np.zeros(0)
    orig_area = np.zeros(n_ent)
    is_poly = np.zeros(n_ent, bool)
    for r in results:
        orig_area[r.poly_idx] = r.poly_area
        is_poly[r.poly_idx] = True
    check = is_poly & R.complete & has_piece
    outside_area = np.concatenate([r.outside_area for r in results]) if results else np.zeros(0)
    piece_area = (np.bincount(owner, weights=np.where(check[owner], area_col, 0.0), minlength=n_ent)
                  + np.bincount(outside_owner, weights=np.where(check[outside_owner], outside_area, 0.0), minlength=n_ent))
    rel = np.abs(piece_area[check] - orig_area[check]) / np.maximum(orig_area[check], 1e-12)
    outcomes = None
    if block is not None:
        status = np.full(n_ent, NO_PIECE, np.int8)
        status[elsewhere], status[off_clip], status[has_piece] = ELSEWHERE, OUTSIDE_CLIP, KEPT
        status[empty] = EMPTY
        ids = np.stack([R.osm_type.astype(np.int64), R.osm_id], axis=1)
        outcomes = {
            "ids": ids, "status": status,
            "repaired": {k: ids[unique_ints(np.concatenate([r.repaired[k] for r in results]))] for k in _BAND_REPAIRS} if results else {},
            "area_ids": ids[check], "area_rel_error": rel,
        }
    area_check = {
        "n_polygons_checked": int(check.sum()),
        "max_rel_error": float(rel.max()) if len(rel) else 0.0,
        "n_over_tolerance": int((rel > AREA_REL_TOL).sum()),
        "tolerance": AREA_REL_TOL,
    }
    timings["merge"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result = TiledRegion(
        epsg=R.epsg, tiles=tiles, entities=entities, n_input=data.n_input,
        n_entities_kept=int(has_piece.sum()), dropped=dropped, repaired=repaired,
        area_check=area_check, timings_s=timings, n_bands=len(bands), n_pieces=len(owner), band_files=band_files,
        outcomes=outcomes,
    )
    if log:
        log(f"tiled {region}: EPSG:{R.epsg}, {tiles.num_rows:,} tiles, {len(owner):,} pieces of {result.n_entities_kept:,} entities")
    return result
