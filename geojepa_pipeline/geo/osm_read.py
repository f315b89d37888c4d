"""Read every tagged OSM feature of a ``.osm.pbf`` in two fast passes with pyosmium.

Pass 1 reads relations only (their tags and members): it tells which nodes and ways are
relation members and doubles as a full integrity check of the file (a truncated or corrupt
PBF fails here, in C++).

Pass 2 reads nodes and ways with a node-location index. Untagged nodes are filtered in C++
and never reach Python; way coordinates come from osmium's C++ WKB factory and are decoded
in one numpy call. No per-feature shapely object is made here.

Entity rule (the method note): a feature is kept when it has at least one tag left after
``osm_rules.filter_tags``, or when it is a member of a relation (then possibly untagged).
Everything else is counted under a reason in ``dropped``. The population accounted for is
every way, every relation, every tagged node and every untagged relation-member node;
untagged non-member nodes are way vertices, not features.

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
import shapely

from ..errors import GeojepaError
from .osm_rules import filter_tags, is_area

NODE, WAY, RELATION = 0, 1, 2
OSM_TYPE_NAMES = ("node", "way", "relation")
_MEMBER_TYPE = {"n": NODE, "w": WAY, "r": RELATION}
_WKB_LINESTRING_HEADER = "0102000000"  # little-endian LineString; 8 more hex digits hold the point count
_WKB_HEADER_HEX = 18


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


def _tags(obj) -> list:
    """All tags of an osmium object as (key, value) tuples.

    Uses pyosmium's C accessors directly: three times faster than iterating ``obj.tags``,
    whose Python-level iterator dominates a read.
    """
    data = obj._pyosmium_data
    it = data.tags_begin()
    nxt = data.tags_next
    return [nxt(it) for _ in range(data.tags_size())]


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
    tags: list  # (N,) per entity: list of (key, value) after filtering
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

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        pts = np.concatenate([self.node_lonlat, self.way_coords]) if len(self.way_coords) else self.node_lonlat
        if len(pts) == 0:
            raise GeojepaError("the extract holds no tagged feature with coordinates; nothing to tile")
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def _decode_way_wkb(hexes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (C, 2) and offsets (W + 1,) from little-endian WKB LineStrings in hex."""
    if not hexes:
        return np.zeros((0, 2)), np.zeros(1, np.int64)
    counts = (np.fromiter(map(len, hexes), np.int64, len(hexes)) - _WKB_HEADER_HEX) // 32
    body = bytes.fromhex("".join(h[_WKB_HEADER_HEX:] for h in hexes))
    coords = np.frombuffer(body, dtype="<f8").reshape(-1, 2).copy()
    offsets = np.zeros(len(hexes) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return coords, offsets


def read_osm(path: str | os.PathLike, log=None) -> OsmData:
    """Read all features of ``path`` (see the module docstring for the rules)."""
    check_pbf_header(path)
    dropped: Counter = Counter()
    repaired: Counter = Counter()

    # ---- pass 1: relations ----------------------------------------------------------------
    rel_ids: list[int] = []
    rel_tags: list = []
    rel_raw_members: list = []
    member_nodes: set[int] = set()
    member_ways: set[int] = set()
    member_rels: set[int] = set()
    try:
        for rel in osmium.FileProcessor(_pbf(path), osmium.osm.RELATION):
            members = [(_MEMBER_TYPE[m.type], m.ref, m.role) for m in rel.members]
            rel_ids.append(rel.id)
            rel_tags.append(filter_tags(_tags(rel)))
            rel_raw_members.append(members)
            for mtype, ref, _ in members:
                (member_nodes if mtype == NODE else member_ways if mtype == WAY else member_rels).add(ref)
    except Exception as exc:
        raise _pbf_error(path, exc) from None
    if log:
        log(f"read {path}: {len(rel_ids):,} relations")

    # ---- pass 2: nodes (tagged only, filtered in C++) and ways with locations -------------
    node_ids: list[int] = []
    node_lonlat: list[tuple[float, float]] = []
    node_tags: list = []
    way_ids: list[int] = []
    way_wkb: list[str] = []
    way_tags: list = []
    way_polygon: list[bool] = []
    way_complete: list[bool] = []
    wkb_factory = osmium.geom.WKBFactory()
    tagged_filter = osmium.filter.EmptyTagFilter()
    tagged_filter.enable_for(osmium.osm.NODE)
    processor = osmium.FileProcessor(_pbf(path), osmium.osm.NODE | osmium.osm.WAY).with_locations().with_filter(tagged_filter)
    n_nodes_seen = n_ways_seen = 0
    try:
        for obj in processor:
            if obj.is_node():
                n_nodes_seen += 1
                tags = filter_tags(_tags(obj))
                if not tags and obj.id not in member_nodes:
                    dropped["only_filtered_tags_not_member"] += 1
                    continue
                loc = obj.location
                node_ids.append(obj.id)
                node_lonlat.append((loc.lon, loc.lat))
                node_tags.append(tags)
                continue
            n_ways_seen += 1
            raw = _tags(obj)
            is_member = obj.id in member_ways
            if not raw and not is_member:
                dropped["untagged_not_member"] += 1
                continue
            tags = filter_tags(raw) if raw else raw
            if not tags and not is_member:
                dropped["only_filtered_tags_not_member"] += 1
                continue
            complete = True
            try:
                wkb = wkb_factory.create_linestring(obj)
            except Exception:  # missing node locations (clipped extract) or < 2 distinct nodes
                coords = [(n.lon, n.lat) for n in obj.nodes if n.location.valid()]
                if not coords:
                    dropped["missing_node_locations"] += 1
                    continue
                if len(coords) < len(obj.nodes):
                    complete = False
                    repaired["partial_way_missing_nodes"] += 1
                wkb = shapely.to_wkb(shapely.LineString(coords * 2 if len(coords) == 1 else coords), hex=True)
            way_ids.append(obj.id)
            way_wkb.append(wkb)
            way_tags.append(tags)
            way_polygon.append(complete and obj.is_closed() and is_area(dict(tags)))
            way_complete.append(complete)
    except GeojepaError:
        raise
    except Exception as exc:
        raise _pbf_error(path, exc) from None
    if way_wkb and not way_wkb[0].upper().startswith(_WKB_LINESTRING_HEADER):
        raise RuntimeError(f"unexpected WKB from osmium: {way_wkb[0][:18]}")

    # Untagged nodes that are relation members: their locations come from the index.
    locations = processor.node_location_storage
    member_only = sorted(member_nodes - set(node_ids))
    for ref in member_only:
        try:
            loc = locations.get(ref)
        except KeyError:
            loc = None
        if loc is None or not loc.valid():
            dropped["missing_node_locations"] += 1
            continue
        node_ids.append(ref)
        node_lonlat.append((loc.lon, loc.lat))
        node_tags.append([])

    coords, offsets = _decode_way_wkb(way_wkb)
    del way_wkb
    way_polygon_arr = np.asarray(way_polygon, bool)
    # a polygon ring needs 4 coordinates (osmium drops repeated nodes: a-b-a is a line)
    short_ring = way_polygon_arr & (np.diff(offsets) < 4)
    if short_ring.any():
        repaired["ring_under_4_points_as_line"] += int(short_ring.sum())
        way_polygon_arr &= ~short_ring

    # ---- relations: resolve members to kept entities, keep or drop -------------------------
    n_nodes, n_ways = len(node_ids), len(way_ids)
    node_index = {nid: i for i, nid in enumerate(node_ids)}
    way_index = {wid: n_nodes + i for i, wid in enumerate(way_ids)}
    rel_pos = {rid: i for i, rid in enumerate(rel_ids)}
    way_complete_arr = np.asarray(way_complete, bool)
    # a relation is kept if it has a tag (or is a member) and, transitively, a present member
    has_geometry: dict[int, bool] = {}

    def present(i: int, stack: frozenset) -> bool:
        if i in has_geometry:
            return has_geometry[i]
        ok = False
        for mtype, ref, _ in rel_raw_members[i]:
            if mtype == NODE and ref in node_index or mtype == WAY and ref in way_index:
                ok = True
            elif mtype == RELATION and ref in rel_pos and ref not in stack and present(rel_pos[ref], stack | {ref}):
                ok = True
            if ok:
                break
        has_geometry[i] = ok
        return ok

    keep_rel = []
    for i, rid in enumerate(rel_ids):
        if not rel_tags[i] and rid not in member_rels:
            dropped["only_filtered_tags_not_member"] += 1
        elif not present(i, frozenset({rid})):
            dropped["relation_without_members_in_extract"] += 1
        else:
            keep_rel.append(i)
    rel_index = {rel_ids[i]: n_nodes + n_ways + k for k, i in enumerate(keep_rel)}
    rel_members, rel_complete = [], []
    for i in keep_rel:
        members, complete = [], True
        for mtype, ref, role in rel_raw_members[i]:
            idx = (node_index if mtype == NODE else way_index if mtype == WAY else rel_index).get(ref)
            if idx is None:
                complete = False
                continue
            if mtype == WAY and not way_complete_arr[idx - n_nodes]:
                complete = False
            members.append((idx, role))
        rel_members.append(members)
        rel_complete.append(complete)
    # completeness is transitive through member relations
    rel_complete_arr = np.asarray(rel_complete, bool)
    first_rel = n_nodes + n_ways
    for _ in range(8):
        changed = False
        for k, members in enumerate(rel_members):
            if rel_complete_arr[k] and any(m >= first_rel and not rel_complete_arr[m - first_rel] for m, _ in members):
                rel_complete_arr[k] = False
                changed = True
        if not changed:
            break

    data = OsmData(
        node_id=np.asarray(node_ids, np.int64), node_lonlat=np.asarray(node_lonlat, np.float64).reshape(-1, 2),
        way_id=np.asarray(way_ids, np.int64), way_coords=coords, way_offsets=offsets,
        way_polygon=way_polygon_arr, way_complete=way_complete_arr,
        rel_id=np.asarray([rel_ids[i] for i in keep_rel], np.int64),
        rel_multipolygon=np.asarray([dict(rel_tags[i]).get("type") == "multipolygon" for i in keep_rel], bool),
        rel_members=rel_members, rel_complete=rel_complete_arr,
        tags=node_tags + way_tags + [rel_tags[i] for i in keep_rel],
        n_input=n_nodes_seen + len(member_only) + n_ways_seen + len(rel_ids),
        dropped=dropped, repaired=repaired,
    )
    if len(data) + sum(dropped.values()) != data.n_input:
        raise AssertionError(f"entity accounting broken: {len(data)} kept + {dict(dropped)} != {data.n_input}")
    if log:
        log(f"read {path}: {data.n_input:,} features, {len(data):,} kept, dropped {dict(dropped)}")
    return data
