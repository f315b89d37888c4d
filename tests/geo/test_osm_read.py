from collections import Counter

import numpy as np
import pytest

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.osm_read import RELATION, WAY, read_osm, validate_pbf
from geojepa_pipeline.geo.osm_rules import is_area, keep_key

from ..conftest import LIECHTENSTEIN, needs_shared
from ..osm_fixtures import rules_fixture


def test_tag_filters():
    for key in ["tiger:cfcc", "source", "source:geometry", "source_ref", "import_uuid", "yh:ID", "created_by",
                "name:en", "old_name", "alt_name:de", "brand:wikipedia", "wikidata", "note", "note:de", "fixme"]:
        assert not keep_key(key), key
    for key in ["name", "building", "highway", "maxspeed", "addr:street", "layer"]:
        assert keep_key(key), key


def test_area_rules():
    assert is_area({"building": "yes"}) and is_area({"landuse": "forest"}) and is_area({"highway": "pedestrian", "area": "yes"})
    assert not is_area({"highway": "residential"}) and not is_area({"barrier": "fence"})
    assert not is_area({"natural": "coastline"}) and not is_area({"building": "yes", "area": "no"})


def test_every_rule_on_a_built_extract(tmp_path):
    data = read_osm(rules_fixture(tmp_path / "rules.osm.pbf"))
    index = {(int(t), int(i)): k for k, (t, i) in enumerate(zip(data.osm_type, data.osm_id))}
    tags = lambda t, i: data.tags[index[(t, i)]].as_py()  # noqa: E731
    # nodes: 1 kept (source dropped), 2 and 3 dropped, 4 kept untagged as a relation member
    assert tags(0, 1) == [("amenity", "bench")]
    assert (0, 2) not in index and (0, 3) not in index
    assert tags(0, 4) == []
    # ways: untagged rings that are members are kept (as lines); 104 and 106 dropped
    assert tags(WAY, 100) == [] and tags(WAY, 102) == [("building", "yes")]
    way_pos = {int(w): k for k, w in enumerate(data.way_id)}
    assert not data.way_polygon[way_pos[100]] and data.way_polygon[way_pos[102]] and not data.way_polygon[way_pos[103]]
    assert (WAY, 104) not in index and (WAY, 106) not in index
    assert (WAY, 105) in index and not data.way_complete[way_pos[105]]
    n = np.diff(data.way_offsets)
    assert n[way_pos[102]] == 5 and n[way_pos[103]] == 2
    # relations: members resolved to entity indices; 301 has none in the extract
    rel_pos = {int(r): k for k, r in enumerate(data.rel_id)}
    assert (RELATION, 301) not in index
    assert data.rel_multipolygon[rel_pos[300]] and not data.rel_multipolygon[rel_pos[302]]
    assert data.rel_members[rel_pos[300]] == [(index[(WAY, 100)], "outer"), (index[(WAY, 101)], "inner"), (index[(0, 4)], "label")]
    assert data.rel_complete[rel_pos[300]] and data.rel_complete[rel_pos[302]]
    # accounting: 4 nodes + 7 ways + 3 relations in; dropped by reason
    assert data.n_input == 14
    assert data.dropped == Counter({"only_filtered_tags_not_member": 2, "untagged_not_member": 1,
                                    "missing_node_locations": 1, "relation_without_members_in_extract": 1})
    assert data.repaired["partial_way_missing_nodes"] == 1
    assert len(data) + sum(data.dropped.values()) == data.n_input


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
