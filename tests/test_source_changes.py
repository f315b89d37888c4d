"""Source change detection (``ingest.check_source``): local files by stat then sha256, http(s) by HEAD validators."""

import os
import shutil

import pytest

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.stages.osm import check_source, current_source_stamp, fetch_extract
from geojepa_pipeline.regions import Region
from geojepa_pipeline.store import Store

from .conftest import _QuietHandler, serve_directory
from .osm_fixtures import rules_fixture, write_pbf


def _other_pbf(path):
    return write_pbf(path, nodes=[(1, 9.52, 47.14, {"amenity": "bench"}), (2, 9.53, 47.14, {"shop": "bakery"})])


def test_local_source_stat_then_hash(tmp_path):
    store = Store(tmp_path / "store")
    src = rules_fixture(tmp_path / "a.osm.pbf")
    region = Region.create("a", str(src))
    first = check_source(region, store)
    assert first.changed and first.reason == "never ingested"

    fetch_extract(region, store)
    stamp = current_source_stamp(store, "a")
    assert stamp["uri"] == str(src) and stamp["size"] == src.stat().st_size and stamp["mtime_ns"] == src.stat().st_mtime_ns
    same = check_source(region, store)
    assert not same.changed and "same size and mtime" in same.reason

    # touch: the stat differs, the content does not -> hashed once, unchanged
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched = check_source(region, store)
    assert not touched.changed and "same sha256" in touched.reason and touched.sha256 == stamp["sha256"]
    # with the previous look as cache, the file is not hashed again: a wrong cached hash proves it
    cached = {"fingerprint": touched.fingerprint, "sha256": "f" * 64}
    assert check_source(region, store, cached).changed

    # new content -> changed, naming both hashes
    _other_pbf(src)
    changed = check_source(region, store)
    assert changed.changed and changed.reason.startswith("content changed (sha256 " + stamp["sha256"][:12])

    # re-fetching makes it current again
    fetch_extract(region, store)
    assert not check_source(region, store).changed

    # a different source registered under the same name is a change, before any hashing
    other = Region.create("a", str(shutil.copy(src, tmp_path / "b.osm.pbf")))
    assert check_source(other, store).reason.startswith("source changed in the registry")


def test_missing_local_source_is_a_one_line_error(tmp_path):
    src = rules_fixture(tmp_path / "a.osm.pbf")
    region = Region.create("a", str(src))
    src.unlink()
    with pytest.raises(GeojepaError, match=r"OSM source .*a\.osm\.pbf does not exist"):
        check_source(region, Store(tmp_path / "store"))


class _ETagHandler(_QuietHandler):
    """The quiet file handler plus an ETag from the file's size and mtime (like nginx)."""

    def end_headers(self):
        path = self.translate_path(self.path)
        if os.path.isfile(path):
            st = os.stat(path)
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        super().end_headers()


@pytest.fixture
def etag_server(tmp_path):
    root = tmp_path / "etag-www"
    root.mkdir()
    base, server = serve_directory(root, _ETagHandler)
    try:
        yield base, root
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("validator", ["Last-Modified", "ETag"])
def test_http_source_by_head_validators(tmp_path, http_server, etag_server, validator):
    base, www = http_server if validator == "Last-Modified" else etag_server
    store = Store(tmp_path / "store")
    src = rules_fixture(www / "x.osm.pbf")
    region = Region.create("x", f"{base}/x.osm.pbf")
    fetch_extract(region, store)
    stamp = current_source_stamp(store, "x")
    field = "etag" if validator == "ETag" else "last_modified"
    assert stamp[field] and stamp["uri"] == region.osm
    unchanged = check_source(region, store)
    assert not unchanged.changed and unchanged.reason == f"unchanged (same {validator})"

    _other_pbf(src)
    st = src.stat()  # Last-Modified has 1 s resolution: move the mtime clearly
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    changed = check_source(region, store)
    assert changed.changed and changed.reason.startswith(f"{validator} changed")
    fetch_extract(region, store)
    assert not check_source(region, store).changed


def test_unreachable_http_source_is_a_one_line_error(tmp_path, closed_port):
    region = Region.create("x", f"http://127.0.0.1:{closed_port}/x.osm.pbf")
    with pytest.raises(GeojepaError, match=r"cannot reach http://127\.0\.0\.1:\d+/x\.osm\.pbf for a HEAD request"):
        check_source(region, Store(tmp_path / "store"))


def test_regions_check_cli(home, tmp_path, capsys):
    from geojepa_pipeline.cli import main

    src = rules_fixture(tmp_path / "a.osm.pbf")
    assert main(["regions", "add", "a", "--osm", str(src)]) == 0
    assert main(["regions", "add", "gone", "--osm", str(shutil.copy(src, tmp_path / "gone.osm.pbf"))]) == 0
    (tmp_path / "gone.osm.pbf").unlink()
    assert main(["materialize", "--region", "a", "--select", "key:osm_extract"]) == 0
    capsys.readouterr()
    assert main(["regions", "check"]) == 1  # a source that cannot be checked: the table says why, the exit code says so
    rows = {line.split(" | ")[0].strip(): line for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert "| no " in rows["a"] and "same size and mtime" in rows["a"]
    assert "| error " in rows["gone"] and "does not exist" in rows["gone"]
    _other_pbf(src)
    assert main(["regions", "check", "a"]) == 0
    assert "| yes " in capsys.readouterr().out
