"""Build small .osm.pbf files on the fly with pyosmium."""

from __future__ import annotations

from pathlib import Path

import osmium


def write_pbf(path: Path, nodes=(), ways=(), relations=()) -> Path:
    """nodes: (id, lon, lat, tags); ways: (id, [node ids], tags); relations: (id, [(type, ref, role)], tags)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    w = osmium.SimpleWriter(str(path))
    try:
        for nid, lon, lat, tags in nodes:
            w.add_node(osmium.osm.mutable.Node(id=nid, location=(lon, lat), tags=tags, version=1))
        for wid, refs, tags in ways:
            w.add_way(osmium.osm.mutable.Way(id=wid, nodes=refs, tags=tags, version=1))
        for rid, members, tags in relations:
            w.add_relation(osmium.osm.mutable.Relation(id=rid, members=members, tags=tags, version=1))
    finally:
        w.close()
    return path


def square_nodes(first_id: int, lon: float, lat: float, size_deg: float):
    """Four corner nodes of a square (counter-clockwise) starting at (lon, lat)."""
    pts = [(lon, lat), (lon + size_deg, lat), (lon + size_deg, lat + size_deg), (lon, lat + size_deg)]
    return [(first_id + i, x, y, {}) for i, (x, y) in enumerate(pts)]


def rules_fixture(path: Path) -> Path:
    """A tiny extract exercising every keep/drop rule (near Vaduz, UTM 32N)."""
    lon, lat = 9.52, 47.14
    nodes = [
        (1, lon, lat, {"amenity": "bench", "source": "survey"}),  # kept, 'source' dropped
        (2, lon + 0.001, lat, {"created_by": "JOSM"}),  # only filtered tags -> dropped
        (3, lon + 0.002, lat, {"name:de": "X", "tiger:cfcc": "A41"}),  # only filtered tags -> dropped
        (4, lon + 0.003, lat, {}),  # untagged member of relation 300 -> kept, no tags
    ]
    nodes += square_nodes(10, lon, lat + 0.01, 0.004)  # outer ring 10..13
    nodes += square_nodes(20, lon + 0.001, lat + 0.011, 0.001)  # inner ring 20..23
    nodes += square_nodes(30, lon + 0.01, lat + 0.01, 0.0005)  # building 30..33
    nodes += [(40, lon + 0.02, lat, {}), (41, lon + 0.03, lat + 0.001, {})]
    ways = [
        (100, [10, 11, 12, 13, 10], {}),  # untagged, member of 300 (outer) -> kept
        (101, [20, 21, 22, 23, 20], {}),  # untagged, member of 300 (inner) -> kept
        (102, [30, 31, 32, 33, 30], {"building": "yes", "source": "bing"}),  # polygon
        (103, [40, 41], {"highway": "residential", "maxspeed": "30"}),  # line
        (104, [40, 41], {}),  # untagged, not a member -> dropped
        (105, [40, 999999], {"highway": "path"}),  # one node missing -> partial line, repaired
        (106, [999998, 999997], {"highway": "path"}),  # all nodes missing -> dropped
    ]
    relations = [
        (300, [("w", 100, "outer"), ("w", 101, "inner"), ("n", 4, "label")], {"type": "multipolygon", "landuse": "forest"}),
        (301, [("w", 777777, "outer")], {"type": "multipolygon", "natural": "water"}),  # no members in extract -> dropped
        (302, [("w", 103, ""), ("w", 102, "")], {"type": "site", "amenity": "school"}),  # collection
    ]
    return write_pbf(path, nodes, ways, relations)


def copy_with_extra_nodes(src: Path, dst: Path, nodes) -> Path:
    """``src`` plus extra tagged nodes (id, lon, lat, tags): a changed version of a real extract."""
    dst = Path(dst)
    dst.unlink(missing_ok=True)
    w = osmium.SimpleWriter(str(dst))
    try:
        for obj in osmium.FileProcessor(str(src)):  # PBF order: nodes, ways, relations
            if obj.type_str() == "n":
                w.add_node(obj)
            elif obj.type_str() == "w":
                if nodes:
                    for nid, lon, lat, tags in nodes:
                        w.add_node(osmium.osm.mutable.Node(id=nid, location=(lon, lat), tags=tags, version=1))
                    nodes = ()
                w.add_way(obj)
            else:
                w.add_relation(obj)
    finally:
        w.close()
    return dst
