"""The 300 m UTM grid: zone choice, projection, tile ids, clipping, minimum rotated boxes.

Cells are half-open squares ``[tx*s, (tx+1)*s) x [ty*s, (ty+1)*s)`` in the region's UTM CRS
(``s`` = tile size in metres, 300 by default), so a point lies in exactly one tile. Tile ids
read ``<epsg>_<tx>_<ty>``, e.g. ``32632_1590_17510`` is the square whose lower-left corner is
at (477000 m, 5253000 m) in EPSG:32632.
"""

from __future__ import annotations

import numpy as np
import shapely
from pyproj import Transformer

TILE_SIZE_M = 300.0

# shapely type ids
_POINT, _LINESTRING, _LINEARRING, _POLYGON, _MULTIPOINT, _MULTILINESTRING, _MULTIPOLYGON, _COLLECTION = range(8)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the standard UTM zone holding (lon, lat) in degrees: 326xx north, 327xx south.

    Plain 6-degree zones; the Norway/Svalbard exceptions are not applied.
    """
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def choose_epsg(geoms_lonlat: np.ndarray) -> int:
    """UTM zone for a set of lon/lat geometries: the zone of the centre of their bounding box."""
    minx, miny, maxx, maxy = shapely.total_bounds(geoms_lonlat)
    if not np.isfinite([minx, miny, maxx, maxy]).all():
        raise ValueError("no geometry with coordinates to choose a UTM zone from")
    return utm_epsg((minx + maxx) / 2.0, (miny + maxy) / 2.0)


def project(geoms_lonlat: np.ndarray, epsg: int) -> np.ndarray:
    """Reproject lon/lat geometries (EPSG:4326) to ``epsg``, all coordinates in one vectorized call."""
    transformer = Transformer.from_crs(4326, epsg, always_xy=True)

    def _transform(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms_lonlat, _transform)


def tile_ids(epsg: int, tx: np.ndarray, ty: np.ndarray) -> list[str]:
    """``f"{epsg}_{tx}_{ty}"`` for each tile index pair."""
    return [f"{epsg}_{x}_{y}" for x, y in zip(tx.tolist(), ty.tolist())]


def parse_tile_id(tile_id: str) -> tuple[int, int, int]:
    """Inverse of ``tile_ids``: ``(epsg, tx, ty)``."""
    epsg, tx, ty = tile_id.split("_")
    return int(epsg), int(tx), int(ty)


def _keep_dimension(pieces: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """Drop the lower-dimensional parts of each piece (a polygon touching a tile edge yields a line)."""
    out = pieces.copy()
    piece_dims = shapely.get_dimensions(pieces)
    mixed = np.flatnonzero((shapely.get_type_id(pieces) == _COLLECTION) | ((piece_dims < dims) & ~shapely.is_empty(pieces)))
    for i in mixed:
        parts = shapely.get_parts(pieces[i])
        keep = parts[shapely.get_dimensions(parts) == dims[i]] if len(parts) else parts
        if len(keep) == 0:
            out[i] = shapely.GeometryCollection()
        elif dims[i] == 2:
            out[i] = shapely.union_all(keep) if len(keep) > 1 else keep[0]
        elif len(keep) == 1:
            out[i] = keep[0]
        else:
            out[i] = shapely.geometrycollections(list(keep)) if dims[i] < 0 else _multi(keep, dims[i])
    return out


def _multi(parts: np.ndarray, dim: int):
    flat = shapely.get_parts(parts)
    if dim == 0:
        return shapely.multipoints(flat)
    if dim == 1:
        return shapely.multilinestrings(flat)
    return shapely.multipolygons(flat)


LEAF_CELLS = 16  # a geometry over more cells than this is halved first (see clip_to_grid)


def clip_to_grid(geoms: np.ndarray, tile_size_m: float = TILE_SIZE_M):
    """Cut projected geometries into one piece per touched tile.

    Args:
        geoms: (N,) shapely geometries in a metric CRS (metres).
        tile_size_m: grid spacing in metres.

    Returns:
        owner: (M,) int64 index into ``geoms`` of each piece's entity.
        tx, ty: (M,) int64 tile indices (the tile's lower-left corner is ``(tx, ty) * tile_size_m``).
        pieces: (M,) geometries in the same CRS: polygons intersected with the tile, lines cut.
        clipped: (M,) bool, True where the piece is not the whole entity geometry.

    Points go to the half-open cell that holds them, and a geometry whose bounds lie in one
    cell is kept whole. Larger ones are halved along cell boundaries, all at once per level,
    until each part spans at most ``LEAF_CELLS`` cells; each part is then intersected with the
    cells under its bounding box. So a long river costs O(vertices x log cells), not
    O(vertices x cells). Pieces of lower dimension than their entity (edge contacts) and empty
    ones are discarded. Geometry collections are clipped part by part (a GEOS overlay would
    merge their parts) and regrouped per tile.
    """
    n = len(geoms)
    type_id = shapely.get_type_id(geoms)
    is_collection = type_id == _COLLECTION
    # explode collections: work items are (source geometry, entity index)
    coll_idx = np.flatnonzero(is_collection)
    if len(coll_idx):
        parts, part_of = shapely.get_parts(geoms[coll_idx], return_index=True)
        keep = ~shapely.is_empty(parts)
        work = np.concatenate([geoms[~is_collection], parts[keep]])
        work_owner = np.concatenate([np.flatnonzero(~is_collection), coll_idx[part_of[keep]]])
    else:
        work, work_owner = geoms, np.arange(n)

    bounds = shapely.bounds(work)
    s = tile_size_m
    ix0 = np.floor(bounds[:, 0] / s).astype(np.int64)
    iy0 = np.floor(bounds[:, 1] / s).astype(np.int64)
    ix1 = np.floor(bounds[:, 2] / s).astype(np.int64)
    iy1 = np.floor(bounds[:, 3] / s).astype(np.int64)
    single = (ix0 == ix1) & (iy0 == iy1)

    owners, txs, tys, pieces = [work_owner[single]], [ix0[single]], [iy0[single]], [work[single]]
    clipped = [np.zeros(int(single.sum()), bool)]
    multi = np.flatnonzero(~single)
    if len(multi):
        o, x, y, p = _clip_multi(work[multi], work_owner[multi], ix0[multi], iy0[multi], ix1[multi], iy1[multi], s)
        owners.append(o), txs.append(x), tys.append(y), pieces.append(p), clipped.append(np.ones(len(o), bool))
    owner = np.concatenate(owners)
    tx, ty = np.concatenate(txs), np.concatenate(tys)
    piece = np.concatenate(pieces) if n else np.empty(0, dtype=object)
    was_clipped = np.concatenate(clipped)
    if len(coll_idx):
        owner, tx, ty, piece, was_clipped = _regroup_collections(owner, tx, ty, piece, was_clipped, is_collection)
    return owner, tx, ty, piece, was_clipped


def _clip_multi(geoms, owner, ix0, iy0, ix1, iy1, s):
    """Clip geometries spanning several cells; ``ix0..iy1`` are inclusive cell ranges."""
    dims = shapely.get_dimensions(geoms)
    done = []  # (geoms, owner, dims, ix0, iy0, ix1, iy1) ready for the per-cell step
    while len(geoms):
        nx, ny = ix1 - ix0 + 1, iy1 - iy0 + 1
        big = nx * ny > LEAF_CELLS
        done.append(tuple(a[~big] for a in (geoms, owner, dims, ix0, iy0, ix1, iy1)))
        if not big.any():
            break
        geoms, owner, dims = geoms[big], owner[big], dims[big]
        ix0, iy0, ix1, iy1, nx, ny = ix0[big], iy0[big], ix1[big], iy1[big], nx[big], ny[big]
        split_x = nx >= ny
        mid_x = ix0 + nx // 2  # first column of the right half
        mid_y = iy0 + ny // 2
        # halves: (a) left/bottom, (b) right/top, as inclusive cell ranges
        a = (ix0, iy0, np.where(split_x, mid_x - 1, ix1), np.where(split_x, iy1, mid_y - 1))
        b = (np.where(split_x, mid_x, ix0), np.where(split_x, iy0, mid_y), ix1, iy1)
        halves = [np.concatenate([a[k], b[k]]) for k in range(4)]
        src = np.concatenate([geoms, geoms])
        cut = shapely.intersection(src, shapely.box(halves[0] * s, halves[1] * s, (halves[2] + 1) * s, (halves[3] + 1) * s))
        dims2 = np.concatenate([dims, dims])
        cut = _keep_dimension(cut, dims2)
        keep = ~shapely.is_empty(cut)
        geoms, owner, dims = cut[keep], np.concatenate([owner, owner])[keep], dims2[keep]
        hx0, hy0, hx1, hy1 = (h[keep] for h in halves)
        # tighten each half's cell range to the bounds of what it holds
        b2 = shapely.bounds(geoms)
        ix0 = np.maximum(hx0, np.floor(b2[:, 0] / s).astype(np.int64))
        iy0 = np.maximum(hy0, np.floor(b2[:, 1] / s).astype(np.int64))
        ix1 = np.minimum(hx1, np.floor(b2[:, 2] / s).astype(np.int64))
        iy1 = np.minimum(hy1, np.floor(b2[:, 3] / s).astype(np.int64))
    g, o, d, x0, y0, x1, y1 = (np.concatenate([t[k] for t in done]) for k in range(7))
    return _clip_cells(g, o, d, x0, y0, x1, y1, s)


def _clip_cells(geoms, owner, dims, ix0, iy0, ix1, iy1, s):
    """Intersect each geometry with every cell of its (small) cell range, vectorized."""
    nx = ix1 - ix0 + 1
    ny = iy1 - iy0 + 1
    counts = nx * ny
    item = np.repeat(np.arange(len(geoms)), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    local = np.arange(counts.sum()) - start
    nx_rep = nx[item]
    tx = ix0[item] + local % nx_rep
    ty = iy0[item] + local // nx_rep
    src = geoms[item]
    pieces = shapely.intersection(src, shapely.box(tx * s, ty * s, (tx + 1) * s, (ty + 1) * s))
    pieces = _keep_dimension(pieces, dims[item])
    keep = ~shapely.is_empty(pieces)
    return owner[item][keep], tx[keep], ty[keep], pieces[keep]


def _regroup_collections(owner, tx, ty, piece, clipped, is_collection):
    """Merge the pieces of a collection entity that fall in one tile into one collection."""
    from_coll = is_collection[owner]
    keep = ~from_coll
    groups: dict[tuple[int, int, int], list] = {}
    for o, x, y, p in zip(owner[from_coll].tolist(), tx[from_coll].tolist(), ty[from_coll].tolist(), piece[from_coll]):
        groups.setdefault((o, x, y), []).append(p)
    keys = sorted(groups)
    merged = np.empty(len(keys), dtype=object)
    for k, key in enumerate(keys):
        ps = groups[key]
        merged[k] = shapely.GeometryCollection(list(shapely.get_parts(ps)))
    arr = np.asarray(keys, np.int64).reshape(-1, 3)
    return (
        np.concatenate([owner[keep], arr[:, 0]]), np.concatenate([tx[keep], arr[:, 1]]),
        np.concatenate([ty[keep], arr[:, 2]]), np.concatenate([piece[keep], merged]),
        np.concatenate([clipped[keep], np.ones(len(keys), bool)]),
    )


def minbox_corners(pieces: np.ndarray, x0: np.ndarray, y0: np.ndarray, tile_size_m: float = TILE_SIZE_M) -> np.ndarray:
    """Minimum rotated rectangle of each piece as 4 corners in tile coordinates.

    Args:
        pieces: (M,) geometries in metres (the same CRS as the grid).
        x0, y0: (M,) lower-left corner of each piece's tile, metres.

    Returns:
        (M, 8) float32: ``x1, y1, ..., x4, y4`` with the tile mapped to [0, 1]^2. Corners go
        counter-clockwise from the lowest (then leftmost) one; they are clipped to [0, 1]
        (a rotated rectangle around a shape near a tile edge can overhang the tile). Lines
        give a degenerate rectangle (a, b, b, a) and points four equal corners.
    """
    m = len(pieces)
    corners = np.zeros((m, 4, 2), np.float64)
    env = shapely.oriented_envelope(pieces)
    types = shapely.get_type_id(env)
    coords, owner = shapely.get_coordinates(env, return_index=True)
    counts = np.bincount(owner, minlength=m)
    starts = np.cumsum(counts) - counts
    poly = types == _POLYGON
    if poly.any():
        s = starts[poly]
        corners[poly] = coords[s[:, None] + np.arange(4)[None, :]]
    line = types == _LINESTRING
    if line.any():
        s = starts[line]
        a, b = coords[s], coords[s + 1]
        corners[line] = np.stack([a, b, b, a], axis=1)
    point = types == _POINT
    if point.any():
        corners[point] = coords[starts[point]][:, None, :]
    empty = counts == 0
    if empty.any():  # should not happen for kept pieces; map to the tile centre
        corners[empty] = np.array([x0[empty], y0[empty]]).T[:, None, :] + tile_size_m / 2
    local = (corners - np.stack([x0, y0], axis=1)[:, None, :]) / tile_size_m
    # orientation: counter-clockwise (shoelace sign), then start at the lowest-leftmost corner
    x, y = local[..., 0], local[..., 1]
    signed = np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1)
    cw = signed < 0
    local[cw] = local[cw][:, ::-1]
    x, y = local[..., 0], local[..., 1]
    key = np.where(np.isclose(y, y.min(axis=1, keepdims=True), atol=1e-9), x, np.inf)
    first = np.argmin(key, axis=1)
    order = (first[:, None] + np.arange(4)[None, :]) % 4
    local = np.take_along_axis(local, order[..., None], axis=1)
    return np.clip(local, 0.0, 1.0).reshape(m, 8).astype(np.float32)
