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


def test_writing_commits_sets_current_and_discards_on_error(tmp_path):
    """store.writing: the one stage -> write -> commit -> current sequence; an error (or no manifest) leaves nothing."""
    import pytest

    from geojepa_pipeline.store import TILES

    store = Store(tmp_path)
    with store.writing(TILES, "r1") as staging:
        (staging.scratch / "spill.arrow").write_bytes(b"temporary")  # scratch goes before the commit
        staging.shard("tiles", 0).write_bytes(b"t0")
        staging.shard("entities", 0).write_bytes(b"e0")
        entry = staging.shard_entry(0, {"tiles": staging.shard("tiles", 0), "entities": staging.shard("entities", 0)}, n_tiles=1)
        staging.manifest = {"schema_version": 1, "shards": [entry]}
    ds = staging.dataset
    assert store.current(TILES, "r1") == ds and sorted(ds.manifest["files"]) == ["entities-00000.parquet", "tiles-00000.parquet"]
    assert [p.read_bytes() for p in ds.shards("tiles")] == [b"t0"] and ds.shards("entities")[0].name == "entities-00000.parquet"
    with pytest.raises(ValueError, match="no sharded table 'tokens'"):
        ds.shards("tokens")
    with pytest.raises(ValueError, match="no file 'x.json'"):
        ds.file("x.json")
    for failing in (lambda s: (_ for _ in ()).throw(OSError("disk full")), lambda s: None):  # an error; no manifest
        with pytest.raises((OSError, RuntimeError)):
            with store.writing(TILES, "r1") as staging:
                staging.shard("tiles", 0).write_bytes(b"half")
                failing(staging)
        assert store.current(TILES, "r1") == ds and store.versions(TILES, "r1") == [ds.data_version]
        assert not [p for p in (tmp_path / TILES / "r1").iterdir() if p.name.startswith(".staging")]


def test_aligned_shards_line_up_tables_by_shard_index_or_name_the_stale_dataset(tmp_path):
    import pytest

    from geojepa_pipeline.errors import GeojepaError
    from geojepa_pipeline.store import IMAGES, TILES, Staging, aligned_shards

    store = Store(tmp_path)

    def write(kind, table, indices):
        with store.writing(kind, "li") as staging:
            entries = []
            for i in indices:
                staging.shard(table, i).write_bytes(f"{table}{i}".encode())
                entries.append(staging.shard_entry(i, {table: staging.shard(table, i)}))
            staging.manifest = {"schema_version": 1, "shards": entries}
        return staging.dataset

    tiles, images = write(TILES, "tiles", [0, 1]), write(IMAGES, "images", [0, 1])
    pairs = aligned_shards((tiles, "tiles"), (images, "images"), (None, "images"))
    assert [(a.read_bytes(), b.read_bytes(), c) for a, b, c in pairs] == [(b"tiles0", b"images0", None), (b"tiles1", b"images1", None)]
    stale = write(IMAGES, "images", [0, 1, 2])  # cut from another tile_shards version
    with pytest.raises(GeojepaError, match=r"tile_images\[li\]@\w+ does not line up with tile_shards\[li\]@\w+ \(3 shards against 2\); re-materialize tile_images\[li\]"):
        aligned_shards((tiles, "tiles"), (stale, "images"))
    with pytest.raises(ValueError, match="no dataset kind has a sharded table 'chips'"):
        Staging(IMAGES, "li", tmp_path).shard_entry(0, {"chips": tmp_path / "x.parquet"})


def test_require_names_the_asset_to_materialize(tmp_path):
    import pytest

    from geojepa_pipeline.errors import GeojepaError
    from geojepa_pipeline.store import CHECKPOINTS, GLOBAL_SCOPE, TAGS, TILES

    store = Store(tmp_path)
    for kind, scope, message in [
        (TILES, "li", "region 'li' has no tile_shards yet; materialize tile_shards[li] first (geojepa materialize --select tile_shards --region li)"),
        (TAGS, GLOBAL_SCOPE, "the store has no tag_embeddings yet; materialize tag_embeddings first"),
        (CHECKPOINTS, "GT", "variant 'GT' has no geojepa_checkpoint yet; materialize geojepa_checkpoint[GT] first "
                            "(geojepa materialize --select geojepa_checkpoint --variant GT)"),
    ]:
        with pytest.raises(GeojepaError) as err:
            store.require(kind, scope)
        assert message in str(err.value)
