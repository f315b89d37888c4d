"""A Dagster instance on PostgreSQL that is misconfigured or down: one line naming the setting; nothing changes."""

import shutil

from geojepa_pipeline.cli import main

from .conftest import REPO, snapshot


def test_missing_and_unreachable_database_name_the_setting(home, monkeypatch, closed_port, capsys):
    (home / "dagster").mkdir(parents=True)
    shutil.copyfile(REPO / "docker" / "dagster.yaml", home / "dagster" / "dagster.yaml")  # PostgreSQL storage
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.delenv(var, raising=False)
    before = snapshot(home)

    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "reads $DAGSTER_PG_" in err and "which is not set" in err
    assert snapshot(home) == before  # the registry did not change

    for var, value in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(closed_port), "DAGSTER_PG_USER": "geojepa",
                       "DAGSTER_PG_PASSWORD": "x", "DAGSTER_PG_DB": "dagster"}.items():
        monkeypatch.setenv(var, value)
    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"PostgreSQL at 127.0.0.1:{closed_port}, Connection refused" in err and "check DAGSTER_PG_HOST, DAGSTER_PG_PORT" in err
    assert snapshot(home) == before
