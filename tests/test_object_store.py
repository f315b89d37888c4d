"""The store on an S3-compatible server (moto, on 127.0.0.1): atomic commits, readers on other machines, the assets."""

import shutil

import boto3
import pytest

from geojepa_pipeline.cli import main
from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.store import Store, sha256_file

UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


def _keys(endpoint, prefix=""):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="geojepa", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _commit(store, kind="tiles", region="r", payload=b"abc"):
    staging = store.new_staging_dir(kind, region)
    (staging / "part-00000.bin").write_bytes(payload)
    ds = store.commit(kind, region, staging, {"schema_version": 1})
    store.set_current(kind, region, ds.data_version)
    return ds


def test_commit_uploads_data_then_manifest_and_other_machines_read_it(s3_server, tmp_path):
    writer = Store("s3://geojepa/p", cache=tmp_path / "machine-a")
    ds = _commit(writer)
    assert _keys(s3_server, "p/") == sorted([f"p/tiles/r/{ds.data_version}/manifest.json", f"p/tiles/r/{ds.data_version}/part-00000.bin",
                                            "p/tiles/r/CURRENT"])
    # a second machine with an empty mirror sees the same current version and fetches it, checked
    reader = Store("s3://geojepa/p", cache=tmp_path / "machine-b")
    assert reader.regions("tiles") == ["r"] and reader.versions("tiles", "r") == [ds.data_version]
    got = reader.current("tiles", "r")
    assert got.data_version == ds.data_version and (got.path / "part-00000.bin").read_bytes() == b"abc"
    assert got.path.is_relative_to(tmp_path / "machine-b")
    # the writer moves CURRENT: the reader follows (the bucket is the truth), and the old version stays readable
    ds2 = _commit(writer, payload=b"abcd")
    assert reader.current_version("tiles", "r") == ds2.data_version
    assert sorted(reader.versions("tiles", "r")) == sorted([ds.data_version, ds2.data_version])
    assert (reader.dataset("tiles", "r", ds.data_version).path / "part-00000.bin").read_bytes() == b"abc"


def test_upload_killed_before_the_manifest_is_not_a_dataset(s3_server, tmp_path):
    store = Store("s3://geojepa/p", cache=tmp_path / "a")
    ds = _commit(store)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    # what a process killed mid-upload leaves: data objects, no manifest
    s3.put_object(Bucket="geojepa", Key="p/tiles/r/00000000deadbeef/part-00000.bin", Body=b"half")
    other = Store("s3://geojepa/p", cache=tmp_path / "b")
    assert other.versions("tiles", "r") == [ds.data_version] and other.current_version("tiles", "r") == ds.data_version
    with pytest.raises(FileNotFoundError, match="no committed tiles dataset r@00000000deadbeef"):
        other.dataset("tiles", "r", "00000000deadbeef")
    # a damaged object is caught against the manifest's sha256 when fetched
    s3.put_object(Bucket="geojepa", Key=f"p/tiles/r/{ds.data_version}/part-00000.bin", Body=b"xyz")
    with pytest.raises(GeojepaError, match="does not match its manifest sha256"):
        Store("s3://geojepa/p", cache=tmp_path / "c").current("tiles", "r")
    assert not list((tmp_path / "c").rglob("part-*")), "nothing half-fetched stays in the mirror"


def test_ingest_and_token_assets_on_s3(s3_server, home, monkeypatch, capsys):
    monkeypatch.setenv("GEOJEPA_STORE", "s3://geojepa/store")
    assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "synthetic"]) == 0
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    keys = _keys(s3_server, "store/")
    for kind in ("osm", "tiles", "scenes", "images", "tokens"):
        assert f"store/{kind}/t/CURRENT" in keys, kind
    for kind in ("tag_embeddings", "geometry_encoder"):
        assert f"store/{kind}/@all/CURRENT" in keys, kind
    store = Store("s3://geojepa/store", cache=home / "cache" / "store" / "s3" / "geojepa" / "store")
    versions = {k: store.current_version(k, "t") for k in ("osm", "tiles", "images", "tokens")}
    assert f"store/osm/t/{versions['osm']}.osm.pbf" in keys and f"store/osm/t/{versions['osm']}.source.json" in keys
    assert not (home / "store").exists(), "nothing is written to the local default store"

    # another machine: an empty mirror; the same materialization finds every version unchanged
    shutil.rmtree(home / "cache")
    capsys.readouterr()
    assert main(["sql", "select count(*) as n from tiles"]) == 0
    n_tiles = int(capsys.readouterr().out.splitlines()[2].strip())
    assert n_tiles == store.current("tiles", "t").manifest["n_tiles"] > 10
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    assert {k: store.current_version(k, "t") for k in versions} == versions
    ds = store.current("tokens", "t")
    assert all(sha256_file(ds.path / n) == f["sha256"] for n, f in ds.manifest["files"].items())


def test_unreachable_object_store_is_a_clear_error(home, monkeypatch, closed_port, capsys):
    monkeypatch.setenv("GEOJEPA_STORE", "s3://geojepa/store")
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 0
    capsys.readouterr()
    assert main(["regions", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "s3://geojepa/store" in err and len(err.strip().splitlines()) == 1
