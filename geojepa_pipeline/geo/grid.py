"""The 300 m UTM grid: zone choice, projection, tile ids, clipping (minimum boxes: ``geo/minbox.py``).

Cells are half-open squares ``[tx*s, (tx+1)*s) x [ty*s, (ty+1)*s)`` in the region's UTM CRS
(``s`` = tile size in metres, 300 by default), so a point lies in exactly one tile. Tile ids
read ``<epsg>_<tx>_<ty>``, e.g. ``32632_1590_17510`` is the square whose lower-left corner is
at (477000 m, 5253000 m) in EPSG:32632.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely import lib

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


def tile_ids(epsg: int, tx: np.ndarray, ty: np.ndarray) -> list[str]:
    """``f"{epsg}_{tx}_{ty}"`` for each tile index pair."""
    return [f"{epsg}_{x}_{y}" for x, y in zip(np.asarray(tx).tolist(), np.asarray(ty).tolist())]


def parse_tile_id(tile_id: str) -> tuple[int, int, int]:
    """Inverse of ``tile_ids``: ``(epsg, tx, ty)``."""
    epsg, tx, ty = tile_id.split("_")
    return int(epsg), int(tx), int(ty)


def dense_key(*cols: np.ndarray) -> np.ndarray:
    """One int64 per row of integer columns, ordered like the rows lexicographically.

    Each column is replaced by its rank among its distinct values, then the ranks are
    combined in mixed radix; a fast 1-D stand-in for ``np.unique(..., axis=0)`` and lexsort.
    """
    key = np.zeros(len(cols[0]), np.int64)
    for col in cols:
        uniq, rank = np.unique(col, return_inverse=True)
        key = key * len(uniq) + rank.reshape(-1)
    return key


def unique_ints(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D integer array: ``np.unique(values)``, by sort and compare.

    numpy 2.4's plain ``np.unique`` on integers hashes, and took 0.27 s for 500 k random
    int64 where sorting takes 3 ms (measured on this project's machines).
    """
    ordered = np.sort(values)
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])] if len(ordered) else ordered


def locate_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``sorted_unique`` of each value, whether it is there), by binary search."""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    i = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return i, sorted_unique[i] == values


def isin_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_unique)`` for a sorted, duplicate-free second array (binary search)."""
    return locate_sorted(values, sorted_unique)[1]


def ranges(offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(offsets[i], offsets[i + 1])`` for each i in ``items`` (vectorized)."""
    lengths = offsets[items + 1] - offsets[items]
    return np.repeat(offsets[items] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())


def _keep_dimension(pieces: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """Drop the lower-dimensional parts of each piece (a polygon touching a tile edge yields a line)."""
    piece_dims = shapely.get_dimensions(pieces)
    mixed = np.flatnonzero((shapely.get_type_id(pieces) == _COLLECTION) | ((piece_dims < dims) & (piece_dims >= 0)))
    if len(mixed) == 0:
        return pieces
    out = pieces.copy()
    parts, idx = shapely.get_parts(pieces[mixed], return_index=True)
    keep = shapely.get_dimensions(parts) == dims[mixed][idx]
    parts, idx = parts[keep], idx[keep]
    n_kept = np.bincount(idx, minlength=len(mixed))
    out[mixed[n_kept == 0]] = shapely.GeometryCollection()
    one = n_kept[idx] == 1
    out[mixed[idx[one]]] = parts[one]
    for dim, ctor in ((0, shapely.multipoints), (1, shapely.multilinestrings), (2, shapely.multipolygons)):
        sel = ~one & (dims[mixed][idx] == dim)
        if sel.any():
            groups, local = np.unique(idx[sel], return_inverse=True)
            out[mixed[groups]] = ctor(parts[sel], indices=local.reshape(-1))
    return out


LEAF_CELLS = 16  # a geometry over more cells than this is halved first (see clip_to_grid)


def clip_to_grid(geoms: np.ndarray, tile_size_m: float = TILE_SIZE_M, x_range: tuple[int, int] | None = None):
    """Cut projected geometries into one piece per touched tile, with GEOS.

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
    O(vertices x cells). Cells (or halves) wholly inside a polygon become the cell box without
    an overlay, and cells it does not touch are skipped, both by prepared-geometry predicates.
    Pieces of lower dimension than their entity (edge contacts) and empty ones are discarded.
    Geometry collections are clipped part by part (a GEOS overlay would merge their parts) and
    regrouped per tile. Polylines are faster through ``cut_lines``.

    ``x_range = (x0, x1)`` keeps only tiles with ``x0 <= tx < x1`` (a band of the grid) and
    clips nothing outside it.
    """
    n = len(geoms)
    type_id = shapely.get_type_id(geoms)
    is_collection = type_id == _COLLECTION
    coll_idx = np.flatnonzero(is_collection)
    if len(coll_idx):  # explode collections: work items are (part, entity index)
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
    multi_mask = ~single
    if x_range is not None:  # the halving below ignores the band, so a piece is the same whatever the bands
        single &= (ix0 >= x_range[0]) & (ix0 < x_range[1])
        multi_mask &= (ix1 >= x_range[0]) & (ix0 < x_range[1])

    owners, txs, tys, pieces = [work_owner[single]], [ix0[single]], [iy0[single]], [work[single]]
    clipped = [np.zeros(int(single.sum()), bool)]
    multi = np.flatnonzero(multi_mask)
    if len(multi):
        o, x, y, p = _clip_multi(work[multi], work_owner[multi], ix0[multi], iy0[multi], ix1[multi], iy1[multi], s, x_range)
        owners.append(o), txs.append(x), tys.append(y), pieces.append(p), clipped.append(np.ones(len(o), bool))
    owner = np.concatenate(owners)
    tx, ty = np.concatenate(txs), np.concatenate(tys)
    piece = np.concatenate(pieces) if n else np.empty(0, dtype=object)
    was_clipped = np.concatenate(clipped)
    if len(coll_idx):
        owner, tx, ty, piece, was_clipped = _regroup_collections(owner, tx, ty, piece, was_clipped, is_collection)
    return owner, tx, ty, piece, was_clipped


def _cut(src: np.ndarray, dims: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Intersect geometries with axis-aligned boxes ``[x0, x1] x [y0, y1]`` (metres), elementwise.

    Polygons go through GEOS rectangle clipping (``clip_by_rect``: ~7x faster than a general
    overlay here, same areas to 1e-8); the rare invalid result is redone by the overlay.
    Points and lines use the overlay, which drops boundary-only contacts consistently.
    """
    out = np.empty(len(src), dtype=object)
    poly = dims == 2
    if poly.any():
        fast = lib.clip_by_rect(src[poly], x0[poly], y0[poly], x1[poly], y1[poly])
        bad = ~shapely.is_valid(fast)
        if bad.any():
            idx = np.flatnonzero(poly)[bad]
            fast[bad] = shapely.intersection(src[idx], shapely.box(x0[idx], y0[idx], x1[idx], y1[idx]))
        out[poly] = fast
    if (~poly).any():
        o = ~poly
        out[o] = shapely.intersection(src[o], shapely.box(x0[o], y0[o], x1[o], y1[o]))
    return _keep_dimension(out, dims)


def _cells_of_ranges(ix0, iy0, ix1, iy1):
    """Every cell of each inclusive range: (item index, tx, ty), row-major within an item."""
    nx, ny = ix1 - ix0 + 1, iy1 - iy0 + 1
    counts = nx * ny
    item = np.repeat(np.arange(len(ix0)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return item, ix0[item] + local % nx[item], iy0[item] + local // nx[item]


def _clip_multi(geoms, owner, ix0, iy0, ix1, iy1, s, x_range=None):
    """Clip geometries spanning several cells; ``ix0..iy1`` are inclusive cell ranges. ``x_range``: halves
    wholly outside it are dropped, and cells outside it skipped; where the halves are cut does not depend on it."""
    x_lo, x_hi = x_range if x_range is not None else (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
    dims = shapely.get_dimensions(geoms)
    done = []  # (geoms, owner, dims, ix0, iy0, ix1, iy1) ready for the per-cell step
    full = []  # (owner, ix0, iy0, ix1, iy1) ranges wholly inside a polygon
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
        src_owner, src_dims = np.concatenate([owner, owner]), np.concatenate([dims, dims])
        in_band = (halves[2] >= x_lo) & (halves[0] < x_hi)
        if not in_band.all():
            halves = [h[in_band] for h in halves]
            src, src_owner, src_dims = src[in_band], src_owner[in_band], src_dims[in_band]
        boxes = shapely.box(halves[0] * s, halves[1] * s, (halves[2] + 1) * s, (halves[3] + 1) * s)
        shapely.prepare(geoms)
        inside = np.zeros(len(src), bool)
        poly = src_dims == 2
        inside[poly] = shapely.contains_properly(src[poly], boxes[poly])
        if inside.any():
            full.append((src_owner[inside],) + tuple(h[inside] for h in halves))
        todo = ~inside & shapely.intersects(src, boxes)
        h = [hh[todo] for hh in halves]
        cut = _cut(src[todo], src_dims[todo], h[0] * s, h[1] * s, (h[2] + 1) * s, (h[3] + 1) * s)
        keep = ~shapely.is_empty(cut)
        geoms, owner, dims = cut[keep], src_owner[todo][keep], src_dims[todo][keep]
        hx0, hy0, hx1, hy1 = (h[todo][keep] for h in halves)
        # tighten each half's cell range to the bounds of what it holds
        b2 = shapely.bounds(geoms)
        ix0 = np.maximum(hx0, np.floor(b2[:, 0] / s).astype(np.int64))
        iy0 = np.maximum(hy0, np.floor(b2[:, 1] / s).astype(np.int64))
        ix1 = np.minimum(hx1, np.floor(b2[:, 2] / s).astype(np.int64))
        iy1 = np.minimum(hy1, np.floor(b2[:, 3] / s).astype(np.int64))
    g, o, d, x0, y0, x1, y1 = (np.concatenate([t[k] for t in done]) for k in range(7))
    out = list(_clip_cells(g, o, d, x0, y0, x1, y1, s, x_lo, x_hi))
    if full:
        fo, fx0, fy0, fx1, fy1 = (np.concatenate([t[k] for t in full]) for k in range(5))
        item, tx, ty = _cells_of_ranges(fx0, fy0, fx1, fy1)
        band = (tx >= x_lo) & (tx < x_hi)
        item, tx, ty = item[band], tx[band], ty[band]
        boxes = shapely.box(tx * s, ty * s, (tx + 1) * s, (ty + 1) * s)
        out = [np.concatenate([out[0], fo[item]]), np.concatenate([out[1], tx]), np.concatenate([out[2], ty]),
               np.concatenate([out[3], boxes])]
    return tuple(out)


def _clip_cells(geoms, owner, dims, ix0, iy0, ix1, iy1, s, x_lo=np.iinfo(np.int64).min, x_hi=np.iinfo(np.int64).max):
    """Intersect each geometry with every cell of its (small) cell range with ``x_lo <= tx < x_hi``, vectorized."""
    item, tx, ty = _cells_of_ranges(ix0, iy0, ix1, iy1)
    band = (tx >= x_lo) & (tx < x_hi)
    item, tx, ty = item[band], tx[band], ty[band]
    src, src_dims = geoms[item], dims[item]
    boxes = shapely.box(tx * s, ty * s, (tx + 1) * s, (ty + 1) * s)
    shapely.prepare(geoms)
    inside = np.zeros(len(src), bool)
    poly = src_dims == 2
    inside[poly] = shapely.contains_properly(src[poly], boxes[poly])
    todo = ~inside & shapely.intersects(src, boxes)
    pieces = np.empty(len(src), dtype=object)
    pieces[inside] = boxes[inside]
    pieces[todo] = _cut(src[todo], src_dims[todo], tx[todo] * s, ty[todo] * s, (tx[todo] + 1) * s, (ty[todo] + 1) * s)
    keep = inside | (todo & ~shapely.is_empty(np.where(todo, pieces, None)))
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
        merged[k] = shapely.GeometryCollection(list(shapely.get_parts(groups[key])))
    arr = np.asarray(keys, np.int64).reshape(-1, 3)
    return (
        np.concatenate([owner[keep], arr[:, 0]]), np.concatenate([tx[keep], arr[:, 1]]),
        np.concatenate([ty[keep], arr[:, 2]]), np.concatenate([piece[keep], merged]),
        np.concatenate([clipped[keep], np.ones(len(keys), bool)]),
    )


def cut_lines(coords: np.ndarray, offsets: np.ndarray, tile_size_m: float = TILE_SIZE_M, tile_local: bool = True):
    """Cut polylines at every grid line, in numpy: O(vertices + crossings), no GEOS overlay.

    Args:
        coords: (C, 2) float64 vertices in metres, all lines back to back.
        offsets: (L + 1,) int64; line i is ``coords[offsets[i]:offsets[i + 1]]`` (>= 2 vertices).
        tile_size_m: grid spacing in metres.

    Returns:
        line: (M,) int64 index of the line each piece belongs to.
        tx, ty: (M,) int64 tile indices.
        pieces: (M,) LineString / MultiLineString in tile-local metres (tile corner at 0, 0), or in
            the input's metres with ``tile_local=False``.
        length: (M,) float64 piece length in metres.

    Each segment is split where it crosses a vertical or horizontal grid line; every
    sub-segment then lies in one half-open cell (that of its midpoint). Consecutive
    sub-segments in one cell form a run; a line's runs in one cell make one piece (a
    MultiLineString when the line leaves and re-enters). Zero-length lines stay whole.
    """
    s = float(tile_size_m)
    n_lines = len(offsets) - 1
    counts = np.diff(offsets)
    line_of_vertex = np.repeat(np.arange(n_lines), counts)
    last_vertex = np.zeros(len(coords), bool)
    last_vertex[offsets[1:] - 1] = True
    seg = np.flatnonzero(~last_vertex)  # segment j runs from vertex seg[j] to seg[j] + 1
    a, b = coords[seg], coords[seg + 1]
    ca, cb = np.floor(a / s).astype(np.int64), np.floor(b / s).astype(np.int64)
    d = b - a

    # crossings of vertical (axis 0) and horizontal (axis 1) grid lines
    ev_seg, ev_t, ev_x, ev_y = [seg], [np.zeros(len(seg))], [a[:, 0]], [a[:, 1]]
    for axis in (0, 1):
        n_cross = np.abs(cb[:, axis] - ca[:, axis])
        has = np.flatnonzero(n_cross)
        if len(has) == 0:
            continue
        rep = np.repeat(has, n_cross[has])
        k = np.arange(len(rep)) - np.repeat(np.cumsum(n_cross[has]) - n_cross[has], n_cross[has])
        lo = np.minimum(ca[rep, axis], cb[rep, axis])
        boundary = (lo + 1 + k) * s
        t = (boundary - a[rep, axis]) / d[rep, axis]
        other = a[rep, 1 - axis] + t * d[rep, 1 - axis]
        ev_seg.append(seg[rep])
        ev_t.append(t)
        ev_x.append(boundary if axis == 0 else other)
        ev_y.append(other if axis == 0 else boundary)
    # the final vertex of each line closes its last segment
    ends = offsets[1:] - 1
    ev_seg.append(ends - 1)
    ev_t.append(np.ones(n_lines))
    ev_x.append(coords[ends, 0])
    ev_y.append(coords[ends, 1])
    ev_seg, ev_t = np.concatenate(ev_seg), np.concatenate(ev_t)
    order = np.lexsort((ev_t, ev_seg))
    px, py = np.concatenate(ev_x)[order], np.concatenate(ev_y)[order]
    pline = line_of_vertex[ev_seg[order]]

    # sub-segments between consecutive events of the same line
    same = pline[:-1] == pline[1:]
    start = np.flatnonzero(same)
    dx, dy = px[start + 1] - px[start], py[start + 1] - py[start]
    sub_len = np.hypot(dx, dy)
    keep = sub_len > 0
    start, sub_len = start[keep], sub_len[keep]
    cx = np.floor((px[start] + 0.5 * dx[keep]) / s).astype(np.int64)
    cy = np.floor((py[start] + 0.5 * dy[keep]) / s).astype(np.int64)
    sub_line = pline[start]
    new_run = np.ones(len(start), bool)
    if len(start) > 1:
        new_run[1:] = (sub_line[1:] != sub_line[:-1]) | (cx[1:] != cx[:-1]) | (cy[1:] != cy[:-1]) | (start[1:] != start[:-1] + 1)
    run_id = np.cumsum(new_run) - 1
    n_runs = int(run_id[-1]) + 1 if len(run_id) else 0

    # run vertices: the start of its first sub-segment, then every sub-segment's end
    emit = 1 + new_run.astype(np.int64)
    event = np.repeat(start + 1, emit)
    first_pos = np.cumsum(emit) - emit
    event[first_pos[new_run]] -= 1
    point_run = np.repeat(run_id, emit)
    run_line = sub_line[new_run]
    run_cx, run_cy = cx[new_run], cy[new_run]
    shift = s if tile_local else 0.0
    local = np.column_stack([px[event] - run_cx[point_run] * shift, py[event] - run_cy[point_run] * shift])
    runs = shapely.linestrings(local, indices=point_run) if n_runs else np.empty(0, dtype=object)
    run_len = np.bincount(run_id, weights=sub_len, minlength=n_runs)

    # zero-length lines (every vertex at one spot) stay whole, in the cell of their first vertex
    line_has_run = np.zeros(n_lines, bool)
    line_has_run[run_line] = True
    flat = np.flatnonzero(~line_has_run)
    if len(flat):
        fx = np.floor(coords[offsets[flat], 0] / s).astype(np.int64)
        fy = np.floor(coords[offsets[flat], 1] / s).astype(np.int64)
        pts_idx = ranges(offsets, flat)
        owner_pt = np.repeat(np.arange(len(flat)), counts[flat])
        flat_local = coords[pts_idx] - np.column_stack([fx, fy])[owner_pt] * shift
        runs = np.concatenate([runs, shapely.linestrings(flat_local, indices=owner_pt)])
        run_line = np.concatenate([run_line, flat])
        run_cx, run_cy = np.concatenate([run_cx, fx]), np.concatenate([run_cy, fy])
        run_len = np.concatenate([run_len, np.zeros(len(flat))])

    # one piece per (line, cell): runs of a line that re-enters a cell become a MultiLineString
    _, first, group = np.unique(dense_key(run_line, run_cx, run_cy), return_index=True, return_inverse=True)
    group = group.reshape(-1)
    n_groups = len(first)
    sizes = np.bincount(group, minlength=n_groups)
    pieces = np.empty(n_groups, dtype=object)
    single = sizes[group] == 1
    pieces[group[single]] = runs[single]
    if (~single).any():
        multi_runs = np.flatnonzero(~single)
        multi_runs = multi_runs[np.argsort(group[multi_runs], kind="stable")]
        groups_m, idx = np.unique(group[multi_runs], return_inverse=True)
        pieces[groups_m] = shapely.multilinestrings(runs[multi_runs], indices=idx.reshape(-1))
    length = np.bincount(group, weights=run_len, minlength=n_groups)
    return run_line[first], run_cx[first], run_cy[first], pieces, length
