"""Faults: a schedule Dagster refuses never reaches the definitions (issue 19, item 1)."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import snapshot
from ..test_cli import one_line_error, run

BAD_CRONS = ["99 99 99 99 99", "0 3 31 2 *", "0 0 30 2 *"]  # out of range; February 31st and 30th never come


@pytest.mark.parametrize("cron", BAD_CRONS)
def test_regions_add_refuses_a_cron_dagster_refuses(home, capsys, cron):
    run(capsys, "regions", "add", "ok", "--osm", "pyrosm:test")
    before = snapshot(home)
    code, _, err = run(capsys, "regions", "add", "x", "--osm", "pyrosm:test", "--schedule", cron)
    assert code != 0
    assert one_line_error(err) == (f"error: invalid --schedule {cron!r}: Dagster does not accept it; give 5 fields (minute hour "
                                   "day-of-month month day-of-week) on days that exist, such as '0 3 * * 1' (weekly), or @daily")
    assert snapshot(home) == before  # the registry is unchanged
    assert run(capsys, "regions", "add", "x", "--osm", "pyrosm:test", "--schedule", "0 3 28 2 *")[0] == 0  # a day that exists


def _hand_edit(home: Path, region: str, cron: str) -> None:
    doc = yaml.safe_load((home / "regions.yaml").read_text())
    doc["regions"][region]["schedule"] = cron
    (home / "regions.yaml").write_text(yaml.safe_dump(doc))


def test_a_bad_cron_in_a_hand_edited_registry_disables_only_that_regions_schedule(home, capsys, caplog):
    from geojepa_pipeline.definitions import build_definitions
    from geojepa_pipeline.regions import default_registry

    run(capsys, "regions", "add", "good", "--osm", "pyrosm:test", "--schedule", "@weekly")
    run(capsys, "regions", "add", "bad", "--osm", "pyrosm:test")
    _hand_edit(home, "bad", "0 3 31 2 *")
    with caplog.at_level(logging.WARNING):
        defs = build_definitions(default_registry().load())
    names = [s.name for s in defs.schedules]
    assert names == ["reingest_good"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["region 'bad': schedule '0 3 31 2 *' is not a cron Dagster accepts, so the region is not re-ingested on a "
                      "schedule; give it 5 fields (minute hour day-of-month month day-of-week) on days that exist, such as "
                      "'0 3 * * 1' (weekly), or @daily in regions.yaml"]
    defs.resolve_all_job_defs()  # the rest of the code location loads
    code, out, _ = run(capsys, "regions", "list")
    assert code == 0 and "0 3 31 2 * (invalid: off)" in out and "@weekly" in out


def test_materialize_works_in_a_fresh_process_beside_a_bad_cron(home, capsys):
    """What broke before: the definitions are built at import, so one bad cron failed every materialize."""
    run(capsys, "regions", "add", "good", "--osm", "pyrosm:test")
    run(capsys, "regions", "add", "bad", "--osm", "pyrosm:test")
    _hand_edit(home, "bad", "99 99 99 99 99")
    exe = Path(sys.executable).parent / "geojepa"
    proc = subprocess.run([str(exe), "materialize", "--region", "good", "--select", "osm_extract"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / "store" / "osm" / "good" / "CURRENT").exists()
    assert "region 'bad': schedule '99 99 99 99 99' is not a cron Dagster accepts" in proc.stderr
