"""Faults: ``geojepa sql`` is read-only over the store (issue 19, item 2)."""

import pytest

from ..conftest import snapshot
from ..test_cli import one_line_error, run


@pytest.fixture(scope="module")
def shards_home(tmp_path_factory):
    """A home with one region's tile shards (pyrosm's test extract)."""
    import os

    home = tmp_path_factory.mktemp("sqlhome") / "home"
    old = {k: os.environ.get(k) for k in ("GEOJEPA_HOME", "DAGSTER_HOME", "GEOJEPA_STORE")}
    os.environ["GEOJEPA_HOME"] = str(home)
    for k in ("DAGSTER_HOME", "GEOJEPA_STORE"):
        os.environ.pop(k, None)
    from geojepa_pipeline.cli import main

    try:
        assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none"]) == 0
        assert main(["materialize", "--region", "t", "--select", "key:osm_extract or key:tile_shards"]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return home


@pytest.fixture
def home(shards_home, monkeypatch):
    monkeypatch.setenv("GEOJEPA_HOME", str(shards_home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("GEOJEPA_STORE", raising=False)
    return shards_home


@pytest.mark.parametrize("query, message", [
    ("COPY (SELECT 1) TO '{home}/store/tiles/t/CURRENT'", "geojepa sql is read-only: it runs SELECT (or EXPLAIN) statements over the store's views, not COPY"),
    ("COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)", "not COPY"),  # a path the views read
    ("COPY (SELECT 1) TO '{tmp}/x.csv'", "not COPY"),
    ("ATTACH '{tmp}/other.db' AS other", "not ATTACH"),
    ("SELECT 1; CREATE TABLE x AS SELECT 1", "not CREATE"),
    ("SET enable_external_access = true", "not SET"),
    ("SELECT * FROM read_csv('/etc/passwd')", "geojepa sql reads only the store's current shards, through its views (Permission Error"),
    ("SELECT * FROM read_parquet('{home}/regions.yaml')", "reads only the store's current shards"),
])
def test_sql_refuses_writes_attaches_and_files_outside_the_views(home, capsys, tmp_path, query, message):
    from geojepa_pipeline.store import TILES, Store

    shard = Store(home / "store").current(TILES, "t").shards("tiles")[0]
    before = snapshot(home / "store")
    code, _, err = run(capsys, "sql", query.format(home=home, shard=shard, tmp=tmp_path))
    assert code != 0 and message in one_line_error(err), err
    assert snapshot(home / "store") == before
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "other.db").exists()
    code, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM tiles")  # the store still reads
    assert code == 0 and out.split()[:3] == ["n", "----", "70"], out


def test_sql_reads_every_view_and_explains(home, capsys):
    for query in ("SELECT count(*) AS n FROM entities", "FROM images", "DESCRIBE tiles",
                  "EXPLAIN SELECT * FROM tiles", "SUMMARIZE tiles"):
        code, _, err = run(capsys, "sql", query)
        assert code == 0, (query, err)
