from collections import Counter

import numpy as np
import pytest
import shapely

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.osm_read import RELATION, WAY, read_osm, validate_pbf
from geojepa_pipeline.geo.osm_rules import filter_tags, is_area, keep_key

from ..conftest import LIECHTENSTEIN, needs_shared
from ..osm_fixtures import rules_fixture


def test_tag_filters():
    for key in ["tiger:cfcc", "source", "source:geometry", "source_ref", "import_uuid", "yh:ID", "created_by",
                "name:en", "old_name", "alt_name:de", "brand:wikipedia", "wikidata", "note", "note:de", "fixme"]:
        assert not keep_key(key), key
    for key in ["name", "building", "highway", "maxspeed", "addr:street", "layer"]:
        assert keep_key(key), key
    assert filter_tags([("building", "yes"), ("source", "bing")]) == [("building", "yes")]


def test_area_rules():
    assert is_area({"building": "yes"}) and is_area({"landuse": "forest"}) and is_area({"highway": "pedestrian", "area": "yes"})
    assert not is_area({"highway": "residential"}) and not is_area({"barrier": "fence"})
    assert not is_area({"natural": "coastline"}) and not is_area({"building": "yes", "area": "no"})


def test_every_rule_on_a_built_extract(tmp_path):
    ents = read_osm(rules_fixture(tmp_path / "rules.osm.pbf"))
    kept = {(int(t), int(i)): (tags, g) for t, i, tags, g in zip(ents.osm_type, ents.osm_id, ents.tags, ents.geometry)}
    # nodes: 1 kept (source dropped), 2 and 3 dropped, 4 kept untagged as a relation member
    assert kept[(0, 1)][0] == [("amenity", "bench")]
    assert (0, 2) not in kept and (0, 3) not in kept
    assert kept[(0, 4)][0] == []
    # ways
    assert kept[(WAY, 100)][0] == [] and kept[(WAY, 100)][1].geom_type == "LineString"  # untagged ring: a line
    assert kept[(WAY, 102)][1].geom_type == "Polygon" and kept[(WAY, 102)][0] == [("building", "yes")]
    assert kept[(WAY, 103)][1].geom_type == "LineString"
    assert (WAY, 104) not in kept and (WAY, 106) not in kept
    assert (WAY, 105) in kept and not ents.complete[list(ents.osm_id).index(105)]
    # relations: multipolygon with a hole; site as a collection; 301 dropped
    forest = kept[(RELATION, 300)][1]
    assert forest.geom_type == "Polygon" and len(forest.interiors) == 1
    outer = shapely.Polygon(kept[(WAY, 100)][1].coords)
    inner = shapely.Polygon(kept[(WAY, 101)][1].coords)
    assert forest.area == pytest.approx(outer.area - inner.area)
    assert (RELATION, 301) not in kept
    assert kept[(RELATION, 302)][1].geom_type == "GeometryCollection"
    # accounting: 4 nodes + 7 ways + 3 relations in; dropped by reason
    assert ents.n_input == 14
    assert ents.dropped == Counter({"only_filtered_tags_not_member": 2, "untagged_not_member": 1,
                                    "missing_node_locations": 1, "relation_without_members_in_extract": 1})
    assert ents.repaired["partial_way_missing_nodes"] == 1
    assert len(ents) + sum(ents.dropped.values()) == ents.n_input


def test_pyrosm_test_extract(pyrosm_test_pbf):
    ents = read_osm(pyrosm_test_pbf)
    assert len(ents) > 100
    assert len(ents) + sum(ents.dropped.values()) == ents.n_input
    assert set(np.unique(ents.osm_type)) <= {0, 1, 2}


@needs_shared
def test_liechtenstein_counts():
    ents = read_osm(LIECHTENSTEIN)
    assert ents.n_input == 8918 and len(ents) == 8606
    # 7,121 ways (one untagged non-member dropped), all 113 relations, 1,373 nodes
    assert Counter(ents.osm_type.tolist()) == Counter({0: 1373, 1: 7120, 2: 113})
    assert ents.dropped == Counter({"only_filtered_tags_not_member": 202, "missing_node_locations": 109, "untagged_not_member": 1})


def test_bad_files(tmp_path, pyrosm_test_pbf):
    data = pyrosm_test_pbf.read_bytes()
    (tmp_path / "half.osm.pbf").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.osm.pbf").write_bytes(b"\x00\x01garbage" * 1000)
    (tmp_path / "empty.osm.pbf").write_bytes(b"")
    with pytest.raises(GeojepaError, match="truncated or corrupt"):
        validate_pbf(tmp_path / "half.osm.pbf")
    with pytest.raises(GeojepaError, match="truncated or corrupt"):
        read_osm(tmp_path / "half.osm.pbf")
    for name in ("garbage.osm.pbf", "empty.osm.pbf"):
        with pytest.raises(GeojepaError, match="not an OSM PBF"):
            validate_pbf(tmp_path / name)
    with pytest.raises(GeojepaError, match="does not exist"):
        validate_pbf(tmp_path / "missing.osm.pbf")
