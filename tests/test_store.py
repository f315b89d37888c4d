import json
import os
import subprocess
import sys
import textwrap

from geojepa_pipeline.store import Store, atomic_write_json, sha256_file


def test_commit_is_content_addressed_and_idempotent(tmp_path):
    store = Store(tmp_path)
    versions = []
    for _ in range(2):
        stage = store.new_staging_dir("demo", "r1")
        (stage / "a.bin").write_bytes(b"hello")
        versions.append(store.commit("demo", "r1", stage, {"schema_version": 1}).data_version)
    assert versions[0] == versions[1]
    assert store.versions("demo", "r1") == [versions[0]]
    assert not [p for p in (tmp_path / "demo" / "r1").iterdir() if p.name.startswith(".staging")]
    stage = store.new_staging_dir("demo", "r1")
    (stage / "a.bin").write_bytes(b"changed")
    v2 = store.commit("demo", "r1", stage, {"schema_version": 1}).data_version
    assert v2 != versions[0]
    assert sorted(store.versions("demo", "r1")) == sorted([versions[0], v2])  # the old version stays readable
    manifest = store.dataset("demo", "r1", v2).manifest
    assert manifest["files"]["a.bin"]["sha256"] == sha256_file(store.dataset("demo", "r1", v2).path / "a.bin")
    store.set_current("demo", "r1", v2)
    assert store.current("demo", "r1").data_version == v2
    assert store.regions("demo") == ["r1"]


def test_staging_of_a_killed_process_is_invisible_and_cleaned(tmp_path):
    store = Store(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal
        from geojepa_pipeline.store import Store
        s = Store({str(tmp_path)!r})
        d = s.new_staging_dir("demo", "r1")
        (d / "half.parquet").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    parent = tmp_path / "demo" / "r1"
    assert [p.name for p in parent.iterdir() if p.name.startswith(".staging")]  # left behind, hidden
    assert store.versions("demo", "r1") == [] and store.current("demo", "r1") is None
    store.new_staging_dir("demo", "r1")  # the next writer removes dead writers' staging
    stale = [p for p in parent.iterdir() if p.name.startswith(".staging") and str(os.getpid()) not in p.name]
    assert stale == []


def test_atomic_write_json(tmp_path):
    p = tmp_path / "x" / "m.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert [q.name for q in p.parent.iterdir()] == ["m.json"]
