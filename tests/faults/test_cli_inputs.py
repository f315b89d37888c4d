"""Faults: what a user can type at the CLI (issue 19, item 8)."""

import shutil

import pytest

from geojepa_pipeline.cli import main

from ..conftest import snapshot
from ..test_cli import run


@pytest.mark.parametrize("argv, message", [
    (["knn", "t_0_0", "--k", "0"], "argument --k: 0 is not >= 1"),
    (["knn", "t_0_0", "--k", "-3"], "argument --k: -3 is not >= 1"),
    (["knn", "t_0_0", "--k", "many"], "argument --k: 'many' is not a whole number"),
    (["materialize", "--epochs", "0"], "argument --epochs: 0 is not >= 1"),
    (["ui", "--port", "70000"], "argument --port: 70000 is not a TCP port (1-65535)"),
])
def test_counts_and_ports_out_of_range_are_refused_before_anything_runs(home, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines()[-1].endswith(message), err
    assert snapshot(home) == {}


def test_file_urls_are_percent_decoded(home, capsys, tmp_path, pyrosm_test_pbf):
    folder = tmp_path / "my dir"
    folder.mkdir()
    shutil.copy(pyrosm_test_pbf, folder / "t é.osm.pbf")
    code, out, err = run(capsys, "regions", "add", "t", "--osm", f"file://{tmp_path}/my%20dir/t%20%C3%A9.osm.pbf")
    assert code == 0, err
    assert f"osm={folder / 't é.osm.pbf'}" in out
    code, _, err = run(capsys, "regions", "add", "u", "--osm", f"file://otherhost{folder}/x.osm.pbf")
    assert code == 2 and "names host 'otherhost': use file:///absolute/path (three slashes)" in err


def test_regions_check_exits_nonzero_when_a_source_cannot_be_checked(home, capsys, tmp_path, pyrosm_test_pbf):
    src = tmp_path / "gone.osm.pbf"
    shutil.copy(pyrosm_test_pbf, src)
    assert run(capsys, "regions", "add", "ok", "--osm", "pyrosm:test")[0] == 0
    assert run(capsys, "regions", "add", "gone", "--osm", str(src))[0] == 0
    code, out, _ = run(capsys, "regions", "check", "ok")
    assert code == 0 and "ok" in out
    src.unlink()
    code, out, _ = run(capsys, "regions", "check")
    assert code == 1 and "error" in out and "does not exist" in out


def test_quiet_prints_nothing_and_verbose_prints_dagsters_events(home, capsys):
    assert run(capsys, "regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none")[0] == 0
    code, out, err = run(capsys, "materialize", "--region", "t", "--select", "osm_extract", "--quiet")
    assert code == 0 and out == "" and err == ""
    code, out, err = run(capsys, "materialize", "--region", "t", "--select", "osm_extract", "--verbose")
    assert code == 0 and 'Started execution of step "osm_extract"' in err and "region t: done" in out
    with pytest.raises(SystemExit):
        main(["materialize", "--quiet", "--verbose"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_verify_on_an_empty_store_says_what_to_do(home, capsys):
    code, out, _ = run(capsys, "verify")
    assert code == 0 and out.strip() == "nothing to verify yet: no dataset is materialized (geojepa materialize)"


def test_sql_help_names_every_view(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sql", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "views: tiles, entities, images" in " ".join(out.split())
