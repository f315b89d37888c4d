"""Read every tagged OSM feature of a ``.osm.pbf``, columnar, in one pass.

The blocks are decoded by pyrosm's raw block decoder (``pyrosm.pbfreader.iter_decoded_blocks``,
Cython) into numpy arrays: ids, coordinates, string-table indices for tags, way node refs,
relation members. Everything after that is vectorized numpy: tag filtering, the keep/drop
rules, node-location lookup for ways (a sorted-id search), the area rule for closed ways.
Measured on the 8x8 replicated Liechtenstein (30 MB): 1 s to decode, ~3 s in all, against
~7 s for a pyosmium read with a Python loop per object. ``validate_pbf`` still uses
pyosmium: a relations-only pass that is the cheapest full integrity check.

Entity rule (the method note): a feature is kept when it has at least one tag left after
``osm_rules.keep_key``, or when it is a member of a relation (then possibly untagged).
Everything else is counted under a reason in ``dropped``. The population accounted for is
every way, every relation, every tagged node and every untagged relation-member node;
untagged non-member nodes are way vertices, not features. A node located off the globe
(|lat| > 90 or |lon| > 180) is treated as outside the extract.

Kept entities are numbered nodes first, then ways, then relations; ``OsmData`` holds them
as arrays in lon/lat degrees (EPSG:4326).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import osmium
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import GeojepaError
from .grid import isin_sorted, locate_sorted, unique_ints
from .osm_rules import AREA_NO, AREA_YES, IMPLIES_AREA, area_vote, keep_key
from .parallel import gc_paused

NODE, WAY, RELATION = 0, 1, 2
OSM_TYPE_NAMES = ("node", "way", "relation")
RELATION_MEMBERS_SCHEMA = pa.schema([("relation_id", pa.int64()), ("member_type", pa.string()),
                                     ("member_id", pa.int64()), ("role", pa.string())])


def check_pbf_header(path: str | os.PathLike) -> None:
    """Cheap check that ``path`` exists and starts like an OSM PBF (an ``OSMHeader`` blob)."""
    path = Path(path)
    if not path.exists():
        raise GeojepaError(f"OSM file {path} does not exist; check the path")
    if not path.is_file():
        raise GeojepaError(f"OSM source {path} is not a file; point --osm at a .osm.pbf file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 15 or head[4:6] != b"\x0a\x09" or head[6:15] != b"OSMHeader":
        raise GeojepaError(f"{path} is not an OSM PBF file (no OSMHeader block); give a .osm.pbf extract")


def _pbf_error(label, exc: Exception) -> GeojepaError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return GeojepaError(f"{label} is not a readable OSM PBF ({msg}); the file is truncated or corrupt: download it again")


class Reasons(Counter):
    """Entities counted by reason (dropped or repaired); with ``record_ids``, ``ids[reason]`` also lists them as
    (K, 2) int64 rows of (osm type, osm id), so that spatial blocks that share entities can be merged."""

    def __init__(self, record_ids: bool = False):
        super().__init__()
        self.ids: dict | None = {} if record_ids else None

    def add(self, reason: str, osm_type: int, ids) -> None:
        ids = np.asarray(ids, np.int64)
        self[reason] += len(ids)
        if self.ids is not None and len(ids):
            self.ids.setdefault(reason, []).append(np.stack([np.full(len(ids), osm_type, np.int64), ids], axis=1))

    def copy(self) -> "Reasons":
        out = Reasons(self.ids is not None)
        out.update(self)
        if self.ids is not None:
            out.ids = {k: list(v) for k, v in self.ids.items()}
        return out


def _pbf(path) -> osmium.io.File:
    """An osmium file handle that is read as PBF whatever the file name says."""
    return osmium.io.File(str(path), "pbf")


@dataclass
class PbfSummary:
    """What pass 1 learns: header facts and relation count, from a full integrity read."""

    bbox_lonlat: tuple[float, float, float, float] | None
    timestamp: str | None
    n_relations: int


def validate_pbf(path: str | os.PathLike, label: str | None = None) -> PbfSummary:
    """Read the whole file (relations decoded, other blocks only decompressed); raise GeojepaError if bad.

    ``label`` names the file in messages (e.g. the source URL of a temporary download).
    """
    label = label or str(path)
    try:
        check_pbf_header(path)
    except GeojepaError as exc:
        raise GeojepaError(str(exc).replace(str(path), label)) from None
    try:
        fp = osmium.FileProcessor(_pbf(path), osmium.osm.RELATION)
        header = fp.header
        n = sum(1 for _ in fp)
    except Exception as exc:  # osmium raises RuntimeError with a "PBF error: …" message
        raise _pbf_error(label, exc) from None
    box = header.box()
    bbox = None
    if box.valid():
        bbox = (box.bottom_left.lon, box.bottom_left.lat, box.top_right.lon, box.top_right.lat)
    return PbfSummary(bbox, header.get("osmosis_replication_timestamp") or header.get("timestamp") or None, n)


@dataclass
class OsmData:
    """Kept features as arrays. Entity index: nodes ``[0, n_nodes)``, then ways, then relations."""

    node_id: np.ndarray  # (Nn,) int64
    node_lonlat: np.ndarray  # (Nn, 2) float64 degrees
    way_id: np.ndarray  # (Nw,) int64
    way_coords: np.ndarray  # (C, 2) float64 degrees, all ways' vertices back to back
    way_offsets: np.ndarray  # (Nw + 1,) int64: way i is way_coords[way_offsets[i]:way_offsets[i + 1]]
    way_polygon: np.ndarray  # (Nw,) bool: closed and an area by its tags
    way_complete: np.ndarray  # (Nw,) bool: every node lies in the extract
    rel_id: np.ndarray  # (Nr,) int64
    rel_multipolygon: np.ndarray  # (Nr,) bool: type=multipolygon (assembled as an area)
    rel_members: list  # (Nr,) lists of (entity index, role) of the members present, in order
    rel_complete: np.ndarray  # (Nr,) bool: every member (transitively) is present and complete
    tags: pa.MapArray  # (N,) per entity: map<key, value> after filtering
    n_input: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    @property
    def n_nodes(self) -> int:
        return len(self.node_id)

    @property
    def n_ways(self) -> int:
        return len(self.way_id)

    def __len__(self) -> int:
        return len(self.node_id) + len(self.way_id) + len(self.rel_id)

    @property
    def osm_type(self) -> np.ndarray:
        """(N,) int8 type per entity index."""
        return np.concatenate([np.full(self.n_nodes, NODE, np.int8), np.full(self.n_ways, WAY, np.int8),
                               np.full(len(self.rel_id), RELATION, np.int8)])

    @property
    def osm_id(self) -> np.ndarray:
        return np.concatenate([self.node_id, self.way_id, self.rel_id]).astype(np.int64)

    def relation_members(self) -> pa.Table:
        """``RELATION_MEMBERS_SCHEMA``: one row per (relation, member) of the kept relations, members in order.

        Consumers need it to follow a relation to the untagged ways and nodes that exist in the shards only
        as its members (the outer way of a building multipolygon, say)."""
        n = np.fromiter((len(m) for m in self.rel_members), np.int64, len(self.rel_members))
        member = np.fromiter((i for m in self.rel_members for i, _ in m), np.int64, int(n.sum()))
        types, ids = self.osm_type, self.osm_id
        return pa.table({
            "relation_id": pa.array(np.repeat(self.rel_id.astype(np.int64), n), pa.int64()),
            "member_type": pa.array(np.asarray(OSM_TYPE_NAMES, object)[types[member]], pa.string()),
            "member_id": pa.array(ids[member], pa.int64()),
            "role": pa.array([r for m in self.rel_members for _, r in m], pa.string()),
        }, schema=RELATION_MEMBERS_SCHEMA)

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        pts = np.concatenate([self.node_lonlat, self.way_coords]) if len(self.way_coords) else self.node_lonlat
        if len(pts) == 0:
            raise GeojepaError("the extract holds no tagged feature with coordinates; nothing to tile")
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


class _StringTable:
    """A block's string table: Arrow strings and which of them are keys we keep."""

    def __init__(self, strings: list[str], used_keys: np.ndarray):
        self.strings = strings
        self.arrow = pa.array(strings, pa.string())
        self.keep = np.zeros(len(strings), bool)
        used = np.zeros(len(strings), bool)  # a mask, not np.unique: hashing the ids took 0.46 s on the 8x8 file
        used[used_keys] = True
        for k in np.flatnonzero(used).tolist():
            self.keep[k] = keep_key(strings[k])


def _csr_owner(offsets: np.ndarray) -> np.ndarray:
    """Row index of each value of a CSR column with these ``offsets`` (R + 1,)."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _map_array(keys: pa.Array, values: pa.Array, owner: np.ndarray, order: np.ndarray, n: int) -> pa.MapArray:
    """``map<string,string>`` for ``n`` elements from tag rows (owner sorted) picked/ordered by ``order``."""
    counts = np.bincount(owner, minlength=n)
    starts = np.cumsum(counts) - counts
    sel_counts = counts[order]
    rows = np.repeat(starts[order] - np.concatenate([[0], np.cumsum(sel_counts)[:-1]]), sel_counts) + np.arange(sel_counts.sum())
    offsets = np.zeros(len(order) + 1, np.int32)
    np.cumsum(sel_counts, out=offsets[1:])
    idx = pa.array(rows.astype(np.int64))
    return pa.MapArray.from_arrays(pa.array(offsets), keys.take(idx), values.take(idx))


def _locate(ids: np.ndarray, sorted_ids: np.ndarray, sort_pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``ids`` among the nodes and whether each was found.

    ``sorted_ids``: the node ids in increasing order; ``sort_pos``: their positions in the
    node arrays (None when the nodes are already sorted, as in most extracts).
    """
    i, found = locate_sorted(ids, sorted_ids)
    if sort_pos is None or len(sort_pos) == 0:  # no located node: every position is a placeholder (found is False)
        return i, found
    return sort_pos[i], found


@dataclass
class _Decoded:
    """Every block's columns, concatenated: all nodes, ways and relations before any keep rule.

    Tag columns are ``_TagColumns.finish()`` tuples (keys, values, owner, raw count per element)."""

    node_id: np.ndarray  # (N,) int64
    node_lon: np.ndarray  # (N,) float64 degrees
    node_lat: np.ndarray
    node_tags: tuple
    way_id: np.ndarray  # (W,) int64
    way_refs: np.ndarray  # all ways' node refs back to back
    way_counts: np.ndarray  # (W,) refs per way
    way_tags: tuple
    rel_id: np.ndarray  # (R,) int64
    mem_type: np.ndarray  # all relations' members back to back: type, ref, role
    mem_ref: np.ndarray
    mem_role: list
    mem_counts: np.ndarray  # (R,) members per relation
    rel_type_value: list  # (R,) the value of each relation's 'type' tag, or None
    rel_tags: tuple
    # osm type -> sorted ids of elements here that are members of relations not necessarily here (a block's
    # share of a file, ``geo.blocks``): ``members`` counts them too
    members_elsewhere: dict | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.node_id)

    @property
    def n_ways(self) -> int:
        return len(self.way_id)

    @property
    def n_rels(self) -> int:
        return len(self.rel_id)

    def members(self, osm_type: int) -> np.ndarray:
        """Sorted distinct ids of the relation members of ``osm_type``."""
        refs = self.mem_ref[self.mem_type == osm_type]
        if self.members_elsewhere is not None:
            refs = np.concatenate([refs, self.members_elsewhere[osm_type]])
        return unique_ints(refs)


@dataclass
class _Tags:
    """One block's kept tags of one element type: (key, value) rows, the element of each (block-local), raw counts."""

    keys: pa.Array
    values: pa.Array
    owner: np.ndarray  # (T,) int64 element index within the block, rows in file order
    n_raw: np.ndarray  # (E,) tags per element before filtering


def _block_tags(table: "_StringTable", keys: np.ndarray, vals: np.ndarray, owner: np.ndarray, n: int) -> _Tags:
    keep = table.keep[keys]
    return _Tags(table.arrow.take(pa.array(keys[keep])), table.arrow.take(pa.array(vals[keep])), owner[keep],
                 np.bincount(owner, minlength=n))


@dataclass
class _Block:
    """The columns of one decoded pbf block (any of its three element types may be empty)."""

    node_id: np.ndarray
    node_lon: np.ndarray
    node_lat: np.ndarray
    node_tags: _Tags
    way_id: np.ndarray
    way_refs: np.ndarray
    way_counts: np.ndarray
    way_tags: _Tags
    rel_id: np.ndarray
    rel_tags: _Tags
    rel_type_value: list
    mem_type: np.ndarray
    mem_ref: np.ndarray
    mem_role: pa.Array
    mem_counts: np.ndarray


_NO_I64 = np.zeros(0, np.int64)


def _no_tags() -> _Tags:
    return _Tags(pa.array([], pa.string()), pa.array([], pa.string()), _NO_I64, _NO_I64)


def iter_blocks(path):
    """Yield every block of the pbf as a ``_Block``, its tags already filtered by ``osm_rules.keep_key``.

    Memory: one block at a time (a pbf block holds up to 8,000 elements)."""
    from pyrosm.pbfreader import iter_decoded_blocks

    try:
        for strings, header, nodes, ways, relations in iter_decoded_blocks(str(path)):
            used = [a for a, key in ((nodes, "keys_vals"), (ways, "keys"), (relations, "keys")) if a is not None and len(a.get(key, ()))]
            table = _StringTable(strings, np.concatenate([a["keys_vals" if "keys_vals" in a else "keys"] for a in used]) if used else np.zeros(0, np.int64))
            block = _Block(_NO_I64, np.zeros(0), np.zeros(0), _no_tags(), _NO_I64, _NO_I64, _NO_I64, _no_tags(),
                           _NO_I64, _no_tags(), [], _NO_I64, _NO_I64, pa.array([], pa.string()), _NO_I64)
            if nodes is not None and len(nodes["id"]):
                n = len(nodes["id"])
                g = header["granularity"]
                block.node_id = nodes["id"]
                block.node_lon = (nodes["lon"] * g + header["lon_offset"]) / 1e9
                block.node_lat = (nodes["lat"] * g + header["lat_offset"]) / 1e9
                kv = nodes["keys_vals"]
                if len(kv):  # each node's key, value ids then a 0 (string 0 is never a key or value)
                    stop = kv == 0
                    node_of = np.cumsum(stop) - stop
                    pos = np.flatnonzero(~stop)
                    block.node_tags = _block_tags(table, kv[pos[0::2]], kv[pos[1::2]], node_of[pos[0::2]], n)
                else:
                    block.node_tags = _block_tags(table, _NO_I64, _NO_I64, _NO_I64, n)
            if ways is not None and len(ways["id"]):
                n = len(ways["id"])
                block.way_id = ways["id"]
                block.way_tags = _block_tags(table, ways["keys"], ways["vals"], _csr_owner(ways["tags_off"]), n)
                block.way_refs = ways["refs"]
                block.way_counts = np.diff(ways["refs_off"])
            if relations is not None and len(relations["id"]):
                n = len(relations["id"])
                block.rel_id = relations["id"]
                block.rel_tags = _block_tags(table, relations["keys"], relations["vals"], _csr_owner(relations["tags_off"]), n)
                for r in range(n):  # the type tag decides how a relation is built
                    a, b = relations["tags_off"][r], relations["tags_off"][r + 1]
                    t = [strings[v] for k, v in zip(relations["keys"][a:b], relations["vals"][a:b]) if strings[k] == "type"]
                    block.rel_type_value.append(t[0] if t else None)
                block.mem_type = relations["types"]
                block.mem_ref = relations["memids"]
                block.mem_role = table.arrow.take(pa.array(relations["roles"])) if len(relations["roles"]) else pa.array([], pa.string())
                block.mem_counts = np.diff(relations["members_off"])
            yield block
    except GeojepaError:
        raise
    except Exception as exc:  # pyrosm raises DecodeError / InvalidOSMFileError / zlib errors
        raise _pbf_error(path, exc) from None


def _concat_tags(parts: list[_Tags], counts: list[int]) -> tuple:
    """``_Decoded``'s tag tuple (keys, values, owner, n_raw) from per-block tags of blocks with ``counts`` elements."""
    bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else []
    owner = np.concatenate([t.owner + base for t, base in zip(parts, bases)]) if parts else _NO_I64
    keys = pa.concat_arrays([t.keys for t in parts]) if parts else pa.array([], pa.string())
    values = pa.concat_arrays([t.values for t in parts]) if parts else pa.array([], pa.string())
    n_raw = np.concatenate([t.n_raw for t in parts]) if parts else _NO_I64
    return keys, values, owner, n_raw


def decoded_from_blocks(blocks) -> _Decoded:
    """Concatenate ``_Block``s (all of a file, or one spatial block's share of it) into one ``_Decoded``."""
    blocks = list(blocks)
    cat = lambda name, dtype=np.int64: np.concatenate([getattr(b, name) for b in blocks]).astype(dtype, copy=False) if blocks else np.zeros(0, dtype)  # noqa: E731
    nonempty = lambda ids, tags: [(len(getattr(b, ids)), getattr(b, tags)) for b in blocks if len(getattr(b, ids))]  # noqa: E731
    tag_tuple = lambda ids, tags: _concat_tags([t for _, t in nonempty(ids, tags)], [n for n, _ in nonempty(ids, tags)])  # noqa: E731
    roles = [b.mem_role for b in blocks if len(b.mem_role)]
    return _Decoded(
        node_id=cat("node_id"), node_lon=cat("node_lon", np.float64), node_lat=cat("node_lat", np.float64),
        node_tags=tag_tuple("node_id", "node_tags"),
        way_id=cat("way_id"), way_refs=cat("way_refs"), way_counts=cat("way_counts"), way_tags=tag_tuple("way_id", "way_tags"),
        rel_id=cat("rel_id"), mem_type=cat("mem_type"), mem_ref=cat("mem_ref"),
        mem_role=pa.concat_arrays(roles).to_pylist() if roles else [], mem_counts=cat("mem_counts"),
        rel_type_value=[v for b in blocks for v in b.rel_type_value], rel_tags=tag_tuple("rel_id", "rel_tags"),
    )


def _decode_blocks(path) -> _Decoded:
    """Decode every block of the pbf in this one process.

    On the 8x8 Liechtenstein, runs of blocks on 2 forked workers took 1.39 s against 1.21 s here, as
    sending 230 MB of columns back cost more than the halved decode (0.80 s with nothing sent back)."""
    return decoded_from_blocks(iter_blocks(path))


def _located(d: "_Decoded") -> np.ndarray:
    """(N,) bool: the node's location is on the globe (|lon| <= 180, |lat| <= 90). A crafted or broken file
    can hold others (a latitude of 95 projects to infinity); such a node counts as not in the extract."""
    return (np.abs(d.node_lon) <= 180.0) & (np.abs(d.node_lat) <= 90.0)


def _node_lookup(node_id: np.ndarray, located: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted ids of the located nodes, their positions in the node arrays or None when those are all
    the nodes, already sorted), for ``_locate``."""
    if located.all() and (len(node_id) == 0 or np.all(node_id[1:] > node_id[:-1])):
        return node_id, None
    pos = np.flatnonzero(located)
    sort_pos = pos[np.argsort(node_id[pos], kind="stable")]
    return node_id[sort_pos], sort_pos


def _kept_nodes(d: _Decoded, lookup, located: np.ndarray, dropped: "Reasons") -> tuple[np.ndarray, int]:
    """(positions of the kept nodes: tagged ones, then untagged relation members; how many were input)."""
    n_raw, n_kept_tags = d.node_tags[3], np.bincount(d.node_tags[2], minlength=d.n_nodes)
    member_nodes = d.members(NODE)
    tagged = np.flatnonzero(n_raw > 0)
    is_member = isin_sorted(d.node_id[tagged], member_nodes)
    keep = (n_kept_tags[tagged] > 0) | is_member
    dropped.add("only_filtered_tags_not_member", NODE, d.node_id[tagged[~keep]])
    keep_tagged = tagged[keep]
    member_only = member_nodes[~isin_sorted(member_nodes, unique_ints(d.node_id[keep_tagged]))]
    off_globe = ~located[keep_tagged]
    if off_globe.any():
        dropped.add("location_off_the_globe", NODE, d.node_id[keep_tagged[off_globe]])
        keep_tagged = keep_tagged[~off_globe]
    pos, found = _locate(member_only, *lookup)
    if (~found).any():
        dropped.add("missing_node_locations", NODE, member_only[~found])
    return np.concatenate([keep_tagged, pos[found]]), len(tagged) + len(member_only)


@dataclass
class _Ways:
    """The kept ways: positions among all ways, their vertices and the facts the area rule needs."""

    kept: np.ndarray  # (Wk,) positions among the decoded ways
    coords: np.ndarray  # (C, 2) float64 degrees, back to back
    offsets: np.ndarray  # (Wk + 1,) int64
    counts: np.ndarray  # (Wk,) vertices per kept way
    closed: np.ndarray  # (W,) over all ways: first ref == last ref, every node located
    partial: np.ndarray  # (W,) some node lies outside the extract


def _way_vertices(d: _Decoded, lookup, dropped: "Reasons", repaired: "Reasons") -> _Ways:
    """Which ways stay, and their located vertices (consecutive repeats of a location dropped).

    Releases the decoded all-node and all-ref columns (``d.release_nodes()``) as soon as they are
    no longer needed: ~200 MB on the 8x8 file, the read's peak when they lived on."""
    n_ways, way_counts, way_refs = d.n_ways, d.way_counts, d.way_refs
    w_raw, w_kept_tags = d.way_tags[3], np.bincount(d.way_tags[2], minlength=n_ways)
    way_member = isin_sorted(d.way_id, d.members(WAY))
    untagged = (w_raw == 0) & ~way_member
    filtered_out = (w_raw > 0) & (w_kept_tags == 0) & ~way_member
    dropped.add("untagged_not_member", WAY, d.way_id[untagged])
    dropped.add("only_filtered_tags_not_member", WAY, d.way_id[filtered_out])
    way_keep = ~untagged & ~filtered_out
    ref_way = np.repeat(np.arange(n_ways), way_counts)
    pos, found = _locate(way_refs, *lookup)
    n_found = np.bincount(ref_way, weights=found, minlength=n_ways).astype(np.int64)
    no_coords = way_keep & (n_found == 0)
    dropped.add("missing_node_locations", WAY, d.way_id[no_coords])
    way_keep &= ~no_coords
    partial = way_keep & (n_found < way_counts)
    if partial.any():
        repaired.add("partial_way_missing_nodes", WAY, d.way_id[partial])
    ref_starts = np.cumsum(way_counts) - way_counts
    closed = (way_counts >= 2) & (way_refs[np.maximum(ref_starts + way_counts - 1, 0)] == way_refs[ref_starts]) & ~partial
    vkeep = found & way_keep[ref_way]
    vx, vy, vway = d.node_lon[pos[vkeep]], d.node_lat[pos[vkeep]], ref_way[vkeep]
    del pos, found, vkeep, ref_way, way_refs
    d.way_refs = None  # every all-ref array goes
    if len(vway):
        same = np.concatenate([[False], (vx[1:] == vx[:-1]) & (vy[1:] == vy[:-1]) & (vway[1:] == vway[:-1])])
        vx, vy, vway = vx[~same], vy[~same], vway[~same]
    kept_ways = np.flatnonzero(way_keep)
    counts = np.bincount(vway, minlength=n_ways)[kept_ways]
    coords = np.column_stack([vx, vy])
    del vx, vy, vway
    single = np.flatnonzero(counts == 1)  # one located vertex: a zero-length line
    if len(single):
        starts = np.cumsum(counts) - counts
        coords = np.insert(coords, starts[single], coords[starts[single]], axis=0)
        counts[single] = 2
    offsets = np.zeros(len(kept_ways) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return _Ways(kept_ways, coords, offsets, counts, closed, partial)


def _way_polygons(d: _Decoded, ways: _Ways, repaired: "Reasons") -> np.ndarray:
    """(Wk,) bool: the kept ways that are areas. The area rule on closed, complete ways: one ``area_vote``
    per distinct (key, value) pair, not per tag; a ring under 4 points stays a line."""
    wk, wv, w_owner, _ = d.way_tags
    votes = np.zeros(len(w_owner), np.int8)
    cand = ways.closed[w_owner]
    if cand.any():
        rows = pa.array(np.flatnonzero(cand))
        pairs = pc.binary_join_element_wise(wk.take(rows), wv.take(rows), "\x00").dictionary_encode()
        split = [p.split("\x00", 1) for p in pairs.dictionary.to_pylist()]
        distinct_votes = np.fromiter((area_vote(k, v) for k, v in split), np.int8, len(split))
        votes[cand] = distinct_votes[pairs.indices.to_numpy(zero_copy_only=False)]
    yes = np.bincount(w_owner, weights=votes == AREA_YES, minlength=d.n_ways) > 0
    no = np.bincount(w_owner, weights=votes == AREA_NO, minlength=d.n_ways) > 0
    implied = np.bincount(w_owner, weights=votes == IMPLIES_AREA, minlength=d.n_ways) > 0
    polygon = ways.closed & (yes | (~no & implied))
    short_ring = polygon[ways.kept] & (ways.counts < 4)
    if short_ring.any():
        repaired.add("ring_under_4_points_as_line", WAY, d.way_id[ways.kept[short_ring]])
    return polygon[ways.kept] & (ways.counts >= 4)


@dataclass
class _Relations:
    kept: np.ndarray  # (Rk,) positions among the decoded relations
    members: list  # (Rk,) lists of (entity index, role) of the members present, in order
    complete: np.ndarray  # (Rk,) bool: every member (transitively) present and complete


def _resolve_relations(d: _Decoded, kept_node_id: np.ndarray, kept_way_id: np.ndarray, way_complete: np.ndarray,
                       dropped: Counter) -> _Relations:
    """Resolve members to kept entities (entity index: nodes, then ways, then relations); keep or drop each relation."""
    n_nodes, n_kept_ways = len(kept_node_id), len(kept_way_id)
    r_kept_tags = np.bincount(d.rel_tags[2], minlength=d.n_rels)
    node_index = dict(zip(kept_node_id.tolist(), range(n_nodes)))
    way_index = dict(zip(kept_way_id.tolist(), range(n_nodes, n_nodes + n_kept_ways)))
    rel_ids = d.rel_id.tolist()
    rel_pos = {rid: i for i, rid in enumerate(rel_ids)}
    mem_start = np.concatenate([[0], np.cumsum(d.mem_counts)]).tolist()
    mem_type_l, mem_ref_l, mem_role = d.mem_type.tolist(), d.mem_ref.tolist(), d.mem_role
    members_of = [list(zip(mem_type_l[a:b], mem_ref_l[a:b], mem_role[a:b])) for a, b in zip(mem_start[:-1], mem_start[1:])]
    member_rel_set = set(d.members(RELATION).tolist())
    has_geometry: dict[int, bool] = {}

    def present(i: int, stack: frozenset) -> bool:
        if i in has_geometry:
            return has_geometry[i]
        ok = False
        for mtype, ref, _ in members_of[i]:
            if mtype == NODE and ref in node_index or mtype == WAY and ref in way_index:
                ok = True
            elif mtype == RELATION and ref in rel_pos and ref not in stack and present(rel_pos[ref], stack | {ref}):
                ok = True
            if ok:
                break
        has_geometry[i] = ok
        return ok

    keep_rel, filtered, absent = [], [], []
    for i, rid in enumerate(rel_ids):
        if r_kept_tags[i] == 0 and rid not in member_rel_set:
            filtered.append(rid)
        elif not present(i, frozenset({rid})):
            absent.append(rid)
        else:
            keep_rel.append(i)
    dropped.add("only_filtered_tags_not_member", RELATION, filtered)
    dropped.add("relation_without_members_in_extract", RELATION, absent)
    first_rel = n_nodes + n_kept_ways
    rel_index = {rel_ids[i]: first_rel + k for k, i in enumerate(keep_rel)}
    rel_members, rel_complete = [], []
    for i in keep_rel:
        members, complete = [], True
        for mtype, ref, role in members_of[i]:
            idx = (node_index if mtype == NODE else way_index if mtype == WAY else rel_index).get(ref)
            if idx is None:
                complete = False
                continue
            if mtype == WAY and not way_complete[idx - n_nodes]:
                complete = False
            members.append((idx, role))
        rel_members.append(members)
        rel_complete.append(complete)
    rel_complete_arr = np.asarray(rel_complete, bool)
    for _ in range(8):  # completeness is transitive through member relations
        changed = False
        for k, members in enumerate(rel_members):
            if rel_complete_arr[k] and any(m >= first_rel and not rel_complete_arr[m - first_rel] for m, _ in members):
                rel_complete_arr[k] = False
                changed = True
        if not changed:
            break
    return _Relations(np.asarray(keep_rel, np.int64), rel_members, rel_complete_arr)


@gc_paused()
def read_osm(path: str | os.PathLike, log=None) -> OsmData:
    """Read all features of ``path`` (see the module docstring for the rules)."""
    check_pbf_header(path)
    d = _decode_blocks(path)
    if log:
        log(f"read {path}: {d.n_nodes:,} nodes, {d.n_ways:,} ways, {d.n_rels:,} relations decoded")
    data = osm_data_from_decoded(d)
    if log:
        log(f"read {path}: {data.n_input:,} features, {len(data):,} kept, dropped {dict(data.dropped)}")
    return data


def osm_data_from_decoded(d: _Decoded, record_ids: bool = False) -> OsmData:
    """The keep/drop rules (module docstring) on decoded columns: a whole file's, or one spatial block's
    (``geo.blocks``), whose ways and relations are complete. Releases ``d``'s large columns as it goes.
    ``record_ids``: ``dropped.ids`` and ``repaired.ids`` also say which entities (``Reasons``)."""
    dropped, repaired = Reasons(record_ids), Reasons(record_ids)
    located = _located(d)
    lookup = _node_lookup(d.node_id, located)
    kept_nodes, n_node_input = _kept_nodes(d, lookup, located, dropped)
    ways = _way_vertices(d, lookup, dropped, repaired)
    kept_node_id = d.node_id[kept_nodes]
    kept_node_lonlat = np.column_stack([d.node_lon[kept_nodes], d.node_lat[kept_nodes]])
    del lookup
    d.node_id = d.node_lon = d.node_lat = None  # the all-node columns go before the relations and the tag maps
    way_polygon = _way_polygons(d, ways, repaired)
    way_complete = ~ways.partial[ways.kept]
    kept_way_id = d.way_id[ways.kept]
    rels = _resolve_relations(d, kept_node_id, kept_way_id, way_complete, dropped)
    n_nodes_total = len(d.node_tags[3])
    tags = pa.concat_arrays([
        _map_array(*d.node_tags[:3], kept_nodes, n_nodes_total),
        _map_array(*d.way_tags[:3], ways.kept, d.n_ways),
        _map_array(*d.rel_tags[:3], rels.kept, d.n_rels),
    ])
    data = OsmData(
        node_id=kept_node_id, node_lonlat=kept_node_lonlat,
        way_id=kept_way_id, way_coords=ways.coords, way_offsets=ways.offsets,
        way_polygon=way_polygon, way_complete=way_complete,
        rel_id=d.rel_id[rels.kept], rel_multipolygon=np.asarray([d.rel_type_value[i] == "multipolygon" for i in rels.kept], bool),
        rel_members=rels.members, rel_complete=rels.complete, tags=tags,
        n_input=n_node_input + d.n_ways + d.n_rels, dropped=dropped, repaired=repaired,
    )
    if len(data) + sum(dropped.values()) != data.n_input:
        raise AssertionError(f"entity accounting broken: {len(data)} kept + {dict(dropped)} != {data.n_input}")
    return data
