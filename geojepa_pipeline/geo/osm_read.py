"""Read every tagged OSM feature of a ``.osm.pbf`` in two fast passes with pyosmium.

Pass 1 reads relations only (their tags and members): it tells which nodes and ways are
relation members and doubles as a full integrity check of the file (a truncated or corrupt
PBF fails here, in C++, in milliseconds per MB).

Pass 2 reads nodes and ways with a node-location index. Untagged nodes are filtered in C++
and never reach Python; way geometries are built as WKB by osmium's C++ factory.

Entity rule (the method note): a feature is kept when it has at least one tag left after
``osm_rules.filter_tags``, or when it is a member of a relation (then possibly untagged).
Everything else is counted under a reason in ``dropped``. The population accounted for is
every way, every relation, every tagged node and every untagged relation-member node;
untagged non-member nodes are way vertices, not features.

Geometries come out in lon/lat degrees (EPSG:4326):

* node -> Point; way -> LineString, or Polygon when closed and ``osm_rules.is_area``;
* ``type=multipolygon`` relation -> (Multi)Polygon assembled from its outer/inner member
  rings, or the member lines when the rings do not close inside the extract;
* any other relation -> the collection of its members' geometries (lines stay lines).
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


def _pbf_error(path, exc: Exception) -> GeojepaError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return GeojepaError(f"{path} is not a readable OSM PBF ({msg}); the file is truncated or corrupt: download it again")


@dataclass
class PbfSummary:
    """What pass 1 learns: header facts and relation count, from a full integrity read."""

    bbox_lonlat: tuple[float, float, float, float] | None
    timestamp: str | None
    n_relations: int


def _pbf(path) -> osmium.io.File:
    """An osmium file handle that is read as PBF whatever the file name says."""
    return osmium.io.File(str(path), "pbf")


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
class OsmEntities:
    """Kept OSM features, aligned arrays of length N, geometry in lon/lat degrees."""

    osm_type: np.ndarray  # (N,) int8: 0 node, 1 way, 2 relation
    osm_id: np.ndarray  # (N,) int64
    tags: list  # (N,) list of [(key, value), ...] after filtering
    geometry: np.ndarray  # (N,) shapely geometries, EPSG:4326
    complete: np.ndarray  # (N,) bool: every node / member lies in the extract
    n_input: int = 0  # features accounted for (kept + dropped)
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.osm_id)


def _raw_tags(obj) -> list[tuple[str, str]]:
    return [(t.k, t.v) for t in obj.tags]


def read_osm(path: str | os.PathLike, log=None) -> OsmEntities:
    """Read all features of ``path`` (see the module docstring for the rules)."""
    path = str(path)
    check_pbf_header(path)
    dropped: Counter = Counter()
    repaired: Counter = Counter()

    # ---- pass 1: relations ----------------------------------------------------------------
    rel_ids: list[int] = []
    rel_tags: list[list[tuple[str, str]]] = []
    rel_members: list[list[tuple[int, int, str]]] = []
    member_nodes: set[int] = set()
    member_ways: set[int] = set()
    try:
        for rel in osmium.FileProcessor(_pbf(path), osmium.osm.RELATION):
            members = [(_MEMBER_TYPE[m.type], m.ref, m.role) for m in rel.members]
            rel_ids.append(rel.id)
            rel_tags.append(filter_tags(_raw_tags(rel)))
            rel_members.append(members)
            for mtype, ref, _ in members:
                if mtype == NODE:
                    member_nodes.add(ref)
                elif mtype == WAY:
                    member_ways.add(ref)
    except Exception as exc:
        raise _pbf_error(path, exc) from None
    member_rels = {ref for members in rel_members for t, ref, _ in members if t == RELATION}
    if log:
        log(f"read {path}: {len(rel_ids):,} relations")

    # ---- pass 2: nodes (tagged only, filtered in C++) and ways with locations -------------
    node_ids: list[int] = []
    node_lonlat: list[tuple[float, float]] = []
    node_tags: list = []
    way_ids: list[int] = []
    way_wkb: list = []
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
                raw = _raw_tags(obj)
                tags = filter_tags(raw)
                if not tags and obj.id not in member_nodes:
                    dropped["only_filtered_tags_not_member"] += 1
                    continue
                node_ids.append(obj.id)
                node_lonlat.append((obj.location.lon, obj.location.lat))
                node_tags.append(tags)
                continue
            n_ways_seen += 1
            raw = _raw_tags(obj)
            is_member = obj.id in member_ways
            if not is_member and not raw:
                dropped["untagged_not_member"] += 1
                continue
            tags = filter_tags(raw) if raw else []
            if not is_member and not tags:
                dropped["only_filtered_tags_not_member"] += 1
                continue
            complete = True
            try:
                wkb = wkb_factory.create_linestring(obj)
            except Exception:  # missing node locations (clipped extract) or < 2 distinct nodes
                coords = [(n.lon, n.lat) for n in obj.nodes if n.location.valid()]
                complete = False
                if len(coords) == 0:
                    dropped["missing_node_locations"] += 1
                    continue
                wkb = shapely.to_wkb(shapely.LineString(coords * 2 if len(coords) == 1 else coords))
                if len(coords) < len(obj.nodes):
                    repaired["partial_way_missing_nodes"] += 1
            closed = complete and len(obj.nodes) >= 4 and obj.nodes[0].ref == obj.nodes[-1].ref
            way_ids.append(obj.id)
            way_wkb.append(wkb)
            way_tags.append(tags)
            way_polygon.append(closed and is_area(dict(tags)))
            way_complete.append(complete)
    except GeojepaError:
        raise
    except Exception as exc:
        raise _pbf_error(path, exc) from None

    # Untagged nodes that are relation members: their locations come from the index.
    locations = processor.node_location_storage
    tagged_node_set = set(node_ids)
    for ref in sorted(member_nodes - tagged_node_set):
        try:
            loc = locations.get(ref)
        except KeyError:
            dropped["missing_node_locations"] += 1
            continue
        if not loc.valid():
            dropped["missing_node_locations"] += 1
            continue
        node_ids.append(ref)
        node_lonlat.append((loc.lon, loc.lat))
        node_tags.append([])
    n_member_only_nodes = len(member_nodes - tagged_node_set)

    # ---- geometries ------------------------------------------------------------------------
    node_geoms = shapely.points(np.asarray(node_lonlat, dtype=np.float64).reshape(-1, 2))
    way_geoms = shapely.from_wkb(way_wkb) if way_wkb else np.empty(0, dtype=object)
    polygon_mask = np.asarray(way_polygon, dtype=bool)
    if polygon_mask.any():
        coords, owner = shapely.get_coordinates(way_geoms[polygon_mask], return_index=True)
        rings = shapely.linearrings(coords, indices=owner)
        way_geoms[polygon_mask] = shapely.polygons(rings)

    node_index = {nid: i for i, nid in enumerate(node_ids)}
    way_index = {wid: i for i, wid in enumerate(way_ids)}
    rel_index = {rid: i for i, rid in enumerate(rel_ids)}
    rel_geoms: list = [None] * len(rel_ids)
    rel_complete = [True] * len(rel_ids)

    def member_geometry(mtype: int, ref: int, stack: tuple) -> object | None:
        if mtype == NODE:
            i = node_index.get(ref)
            return None if i is None else node_geoms[i]
        if mtype == WAY:
            i = way_index.get(ref)
            return None if i is None else way_geoms[i]
        i = rel_index.get(ref)
        if i is None or ref in stack:
            return None
        return relation_geometry(i, stack + (ref,))

    def relation_geometry(i: int, stack: tuple) -> object | None:
        if rel_geoms[i] is not None:
            return rel_geoms[i] if not rel_geoms[i].is_empty else None
        tags = dict(rel_tags[i])
        parts, outer, inner = [], [], []
        complete = True
        for mtype, ref, role in rel_members[i]:
            g = member_geometry(mtype, ref, stack)
            if g is None:
                complete = False
                continue
            if mtype == WAY and not way_complete[way_index[ref]]:
                complete = False
            parts.append(g)
            if mtype == WAY:
                line = g.exterior if g.geom_type == "Polygon" else g
                (inner if role == "inner" else outer).append(line)
        geom = None
        if tags.get("type") == "multipolygon" and outer:
            geom = _assemble_multipolygon(outer, inner)
            if geom is None:
                repaired["multipolygon_unclosed_as_lines"] += 1
        if geom is None and parts:
            geom = _collect(parts)
        rel_complete[i] = complete
        rel_geoms[i] = geom if geom is not None else shapely.GeometryCollection()
        return geom

    for i in range(len(rel_ids)):
        relation_geometry(i, (rel_ids[i],))

    # ---- keep / drop relations ------------------------------------------------------------
    keep_rel = []
    for i, rid in enumerate(rel_ids):
        if not rel_tags[i] and rid not in member_rels:
            dropped["only_filtered_tags_not_member"] += 1
        elif rel_geoms[i].is_empty:
            dropped["relation_without_members_in_extract"] += 1
        else:
            keep_rel.append(i)

    n_nodes = len(node_ids)
    osm_type = np.concatenate([
        np.full(n_nodes, NODE, np.int8), np.full(len(way_ids), WAY, np.int8), np.full(len(keep_rel), RELATION, np.int8)
    ])
    osm_id = np.concatenate([
        np.asarray(node_ids, np.int64), np.asarray(way_ids, np.int64), np.asarray([rel_ids[i] for i in keep_rel], np.int64)
    ])
    geometry = np.concatenate([
        node_geoms, way_geoms, np.asarray([rel_geoms[i] for i in keep_rel], dtype=object)
    ]) if len(osm_id) else np.empty(0, dtype=object)
    complete = np.concatenate([
        np.ones(n_nodes, bool), np.asarray(way_complete, bool), np.asarray([rel_complete[i] for i in keep_rel], bool)
    ])
    tags = node_tags + way_tags + [rel_tags[i] for i in keep_rel]
    n_input = n_nodes_seen + n_member_only_nodes + n_ways_seen + len(rel_ids)
    entities = OsmEntities(osm_type, osm_id, tags, geometry, complete, n_input, dropped, repaired)
    if len(entities) + sum(dropped.values()) != n_input:
        raise AssertionError(f"entity accounting broken: {len(entities)} kept + {dict(dropped)} != {n_input}")
    if log:
        log(f"read {path}: {n_input:,} features, {len(entities):,} kept, dropped {dict(dropped)}")
    return entities


def _assemble_multipolygon(outer: list, inner: list):
    """Polygons from member rings: union(outer faces) minus union(inner faces), or None."""
    outer_faces = shapely.get_parts(shapely.polygonize(outer))
    if len(outer_faces) == 0:
        return None
    geom = shapely.union_all(outer_faces)
    if inner:
        inner_faces = shapely.get_parts(shapely.polygonize(inner))
        if len(inner_faces):
            geom = shapely.difference(geom, shapely.union_all(inner_faces))
    return None if geom.is_empty else geom


def _collect(parts: list):
    """One geometry from member geometries: Multi* when all share a type family, else a collection."""
    families = {p.geom_type.replace("Multi", "") for p in parts}
    if families == {"Point"}:
        return shapely.MultiPoint(list(shapely.get_parts(parts)))
    if families == {"LineString"}:
        return shapely.MultiLineString(list(shapely.get_parts(parts)))
    if families == {"Polygon"}:
        return shapely.MultiPolygon(list(shapely.get_parts(parts)))
    return shapely.GeometryCollection(list(parts))
