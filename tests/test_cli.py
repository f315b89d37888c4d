import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geojepa_pipeline.cli import main

from .conftest import LIECHTENSTEIN, needs_shared, snapshot, visible_datasets


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_regions_add_list_remove(home, capsys, pyrosm_test_pbf):
    code, out, _ = run(capsys, "regions", "add", "t", "--osm", f"file://{pyrosm_test_pbf}", "--schedule", "@daily")
    assert code == 0 and "added region t" in out
    code, out, _ = run(capsys, "regions", "list")
    assert code == 0 and "t " in out and str(pyrosm_test_pbf) in out and "@daily" in out
    code, out, _ = run(capsys, "regions", "remove", "t")
    assert code == 0 and "removed region t" in out
    code, out, _ = run(capsys, "regions", "list")
    assert "no regions yet" in out


@pytest.mark.parametrize("name", ["../x", "A B", ""])
def test_bad_names_exit_nonzero_and_leave_registry_unchanged(home, capsys, name):
    run(capsys, "regions", "add", "ok", "--osm", "pyrosm:test")
    before = snapshot(home)
    code, _, err = run(capsys, "regions", "add", name, "--osm", "pyrosm:test")
    assert code != 0 and "invalid region name" in one_line_error(err)
    assert snapshot(home) == before


def test_bad_sources_are_refused_at_add(home, capsys, tmp_path):
    run(capsys, "regions", "add", "ok", "--osm", "pyrosm:test")
    (tmp_path / "garbage.osm.pbf").write_bytes(b"GARBAGE" * 5000)
    before = snapshot(home)
    for src, msg in [(str(tmp_path / "missing.osm.pbf"), "does not exist"),
                     (str(tmp_path / "garbage.osm.pbf"), "not an OSM PBF")]:
        code, _, err = run(capsys, "regions", "add", "x", "--osm", src)
        assert code != 0 and msg in one_line_error(err)
        assert snapshot(home) == before


def test_bad_inputs_at_materialize_leave_no_shards(home, capsys, tmp_path, pyrosm_test_pbf, closed_port):
    half = tmp_path / "half.osm.pbf"
    data = pyrosm_test_pbf.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    gone = tmp_path / "gone.osm.pbf"
    shutil.copy(pyrosm_test_pbf, gone)
    run(capsys, "regions", "add", "trunc", "--osm", str(half))
    run(capsys, "regions", "add", "down", "--osm", f"http://127.0.0.1:{closed_port}/x.osm.pbf")
    run(capsys, "regions", "add", "gone", "--osm", str(gone))
    gone.unlink()  # the source disappears after registration
    registry_before = (home / "regions.yaml").read_bytes()
    cases = {"trunc": "truncated or corrupt", "down": "cannot reach", "gone": "does not exist", "nope": "unknown region"}
    for region, msg in cases.items():
        code, out, err = run(capsys, "materialize", "--region", region)
        assert code != 0
        assert msg in one_line_error(err), err
        assert len((out + err).strip().splitlines()) <= 2 and "Traceback" not in err  # the stage line, the error
        if region != "nope":  # the traceback is in the full log the error names
            assert "Stack Trace:" in Path(one_line_error(err).rsplit("(full log: ", 1)[1].rstrip(")")).read_text()
    assert (home / "regions.yaml").read_bytes() == registry_before
    assert visible_datasets(home / "store") == []
    assert not [p for p in (home / "store").rglob("*.osm.pbf")]  # no partial extract either


def test_console_script_reports_one_line(home):
    exe = Path(sys.executable).parent / "geojepa"
    proc = subprocess.run([str(exe), "regions", "add", "A B", "--osm", "pyrosm:test"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: invalid region name")


def test_http_region_end_to_end(home, capsys, http_server, pyrosm_test_pbf):
    base, www = http_server
    shutil.copy(pyrosm_test_pbf, www / "t.osm.pbf")
    assert run(capsys, "regions", "add", "web", "--osm", f"{base}/t.osm.pbf")[0] == 0
    code, out, err = run(capsys, "materialize", "--region", "web", "--epochs", "2")
    assert code == 0, err
    # the terminal: a line per stage and the warnings (imagery 'none'), not Dagster's events; they are in the log
    lines = (out + err).strip().splitlines()
    assert len(lines) <= 20 and not [line for line in lines if "DEBUG" in line or "STEP_" in line], out + err
    full_log = Path(lines[-1].split("full log: ", 1)[1])
    assert 'Started execution of step "tile_shards.tile_shards_plan"' in full_log.read_text()
    code, out, _ = run(capsys, "sql", "SELECT region, count(*) AS n FROM tiles GROUP BY region")
    assert code == 0 and "web" in out
    code, _, err = run(capsys, "sql", "SELECT nope FROM tiles")
    assert code != 0 and "SQL error" in one_line_error(err)


def test_select_only_the_extract(home, capsys):
    run(capsys, "regions", "add", "t", "--osm", "pyrosm:test")
    code, _, err = run(capsys, "materialize", "--region", "t", "--select", "osm_extract")
    assert code == 0, err
    assert (home / "store" / "osm" / "t" / "CURRENT").exists()
    assert visible_datasets(home / "store") == []
    code, _, err = run(capsys, "materialize", "--select", "key:(")
    assert code != 0 and "invalid --select" in one_line_error(err)


@needs_shared
def test_liechtenstein_via_cli(home, capsys):
    # imagery none: synthetic scenes for all of Liechtenstein take ~80 s here (bench/imagery.py times them)
    assert run(capsys, "regions", "add", "li", "--osm", str(LIECHTENSTEIN), "--imagery", "none")[0] == 0
    # up to the tokens: training and evaluation have their own tests (on the demo extract: tests/test_demo.py)
    code, _, err = run(capsys, "materialize", "--region", "li", "--select", "group:ingest or group:imagery or group:tokens")
    assert code == 0, err
    code, out, _ = run(capsys, "sql", "select count(*) from tiles")
    assert code == 0 and "3146" in out
    # no imagery: every tile is kept in tile_images, marked as having no image
    code, out, _ = run(capsys, "sql", "select count(*), sum(has_image::int), max(coverage) from images where region = 'li'")
    assert code == 0 and out.splitlines()[2].split("|")[0].strip() == "3146"
    assert [c.strip() for c in out.splitlines()[2].split("|")[1:]] == ["0", "0.0"]
    # a second materialization of the vocabulary embeds 0 new pairs
    assert run(capsys, "materialize", "--select", "tag_embeddings")[0] == 0
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        events = instance.fetch_materializations(dg.AssetKey("tag_embeddings"), limit=2).records
        new = [e.asset_materialization.metadata["n_new_embedded"].value for e in events]
    assert new[0] == 0 and new[1] > 500  # newest first: 0 now, Liechtenstein's whole vocabulary before
    code, out, _ = run(capsys, "sql", "select count(*) from entities where tags['building'] is not null")
    assert code == 0 and int(out.splitlines()[2]) > 3000


def test_materialize_plans_runs_in_phase_order_with_each_assets_config():
    """The runs materialize_regions makes: regions, the assets over all regions, tokens, then models; each asset gets its config."""
    import dagster as dg

    from geojepa_pipeline.cli import _plan_runs, _run_config
    from geojepa_pipeline.definitions import ALL_ASSETS

    everything = {k for a in ALL_ASSETS for k in a.keys}
    runs = _plan_runs(everything, ["a", "b"], ["a"], ["b"], ["GT", "T"], "tiny", "none")
    assert [r.label for r in runs] == ["a", "b", "@all", "a:tokens", "b:tokens", "model:GT", "model:T", "a|GT", "b|GT", "a|T", "b|T"]
    assert [r.partition for r in runs] == ["a", "b", None, "a", "b", "GT", "T", "a|GT", "b|GT", "a|T", "b|T"]
    assert runs[-1].partition.keys_by_dimension == {"region": "b", "variant": "T"}  # a dg.MultiPartitionKey
    assert dg.AssetKey("tile_shards") in runs[0].keys and dg.AssetKey("tile_tokens") not in runs[0].keys
    assert _run_config(runs[2].keys, runs[2].config) == {"ops": {"geometry_encoder": {"config": {"holdout_regions": ["b"]}}}}
    extra = {"geojepa_checkpoint": {"epochs": 2, "preset": "small"}, "naip_scenes": {"synthetic_res_m": 1.2}}
    model = _run_config(runs[5].keys, runs[5].config, extra)["ops"]  # later configs win; assets not in the run get nothing
    assert model["geojepa_checkpoint"]["config"] == {"preset": "small", "compile": "none", "holdout_regions": ["b"], "regions": ["a"], "epochs": 2}
    assert model["evaluation_report"]["config"] == {"holdout_regions": ["b"]} and "naip_scenes" not in model
    assert _run_config(runs[0].keys, runs[0].config, extra) == {"ops": {"naip_scenes": {"config": {"synthetic_res_m": 1.2}}}}
    only_tiles = _plan_runs({dg.AssetKey("tile_shards")}, ["a"], [], [], ["GT"], "tiny", "none")
    assert [(r.label, r.keys) for r in only_tiles] == [("a", {dg.AssetKey("tile_shards")})]


def test_regions_add_clip_ingests_only_the_touching_tiles(home, capsys):
    from geojepa_pipeline.store import Store

    code, out, _ = run(capsys, "regions", "add", "c", "--osm", "pyrosm:test", "--imagery", "none", "--clip", "26.942,60.526,26.958,60.535")
    assert code == 0 and "clip=26.942,60.526,26.958,60.535" in out
    assert "(clip 26.942,60.526,26.958,60.535)" in run(capsys, "regions", "list")[1]
    assert run(capsys, "materialize", "--region", "c", "--select", "key:osm_extract or key:tile_shards")[0] == 0
    m = Store(home / "store").current("tiles", "c").manifest
    assert m["clip"]["source"] == "26.942,60.526,26.958,60.535" and len(m["clip"]["polygon_sha256"]) == 64
    assert m["accounting"]["balanced"] and m["accounting"]["dropped"]["outside_clip"] > 0 and 0 < m["n_tiles"] < 70
    code, _, err = run(capsys, "regions", "add", "d", "--osm", "pyrosm:test", "--clip", "26.9,60.5,26.8")
    assert code == 2 and "--clip '26.9,60.5,26.8': give W,S,E,N in degrees" in one_line_error(err)
