import os
import signal
import subprocess
import sys
import textwrap
import time

from geojepa_pipeline.stages.osm import build_tile_shards
from geojepa_pipeline.store import Store

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import geojepa_pipeline.geo.shards as shards
    real_write, n = shards._write, [0]
    def write_then_hang(table, path):
        real_write(table, path)
        n[0] += 1
        if n[0] == 3:  # some shards are on disk now
            print("WRITING", flush=True)
            time.sleep(120)
    shards._write = write_then_hang
    from geojepa_pipeline.stages.osm import build_tile_shards
    from geojepa_pipeline.store import Store
    build_tile_shards("r", Store(sys.argv[1]), extract_path=Path(sys.argv[2]), source={}, shard_tiles=8)
""")


def test_kill_9_mid_write_leaves_nothing_visible(tmp_path, pyrosm_test_pbf):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root), str(pyrosm_test_pbf)],
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "WRITING" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        assert "WRITING" in line, "the writer never reached its third shard"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = Store(root)
    region_dir = root / "tiles" / "r"
    staging = [p for p in region_dir.iterdir() if p.name.startswith(".staging")]
    assert staging and list(staging[0].glob("*.parquet"))  # half-written shards exist, hidden
    assert store.versions("tiles", "r") == [] and store.current("tiles", "r") is None
    # the next materialization succeeds and clears the dead writer's staging directory
    result = build_tile_shards("r", store, extract_path=pyrosm_test_pbf, source={}, shard_tiles=8)
    assert store.versions("tiles", "r") == [result.dataset.data_version]
    assert not [p for p in region_dir.iterdir() if p.name.startswith(".")]
    assert not Store.scratch_dir(result.dataset.path).exists()
    assert sorted(result.manifest["files"]) == sorted(p.name for p in result.dataset.path.glob("*.parquet"))


def test_failure_mid_write_discards_staging(tmp_path, pyrosm_test_pbf, monkeypatch):
    import geojepa_pipeline.geo.shards as shards

    def broken(table, path):
        raise OSError("disk full")

    monkeypatch.setattr(shards, "_write", broken)
    store = Store(tmp_path)
    try:
        build_tile_shards("r", store, extract_path=pyrosm_test_pbf, source={})
    except OSError as exc:
        assert "disk full" in str(exc)
    else:
        raise AssertionError("the write error was swallowed")
    assert list((tmp_path / "tiles" / "r").iterdir()) == []
