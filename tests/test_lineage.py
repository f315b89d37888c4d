"""``geojepa lineage``: re-ingest a changed region, retrain, and follow both model versions back to their data."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from geojepa_pipeline.cli import main
from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.lineage import parse_model_spec, parse_region_spec
from geojepa_pipeline.store import Store

from .osm_fixtures import copy_with_extra_nodes

UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


def _json(capsys, *args):
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_two_model_versions_point_at_their_own_region_versions(home, tmp_path, capsys, pyrosm_test_pbf):
    src = tmp_path / "t.osm.pbf"
    shutil.copyfile(pyrosm_test_pbf, src)
    assert main(["regions", "add", "t", "--osm", str(src), "--imagery", "synthetic"]) == 0
    train = ["materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "2"]
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    assert main(train) == 0
    # the region's source changes; re-ingest and retrain
    copy_with_extra_nodes(pyrosm_test_pbf, src, [(10**12, 26.9451, 60.5260, {"amenity": "cafe", "name": "Uusi"})])
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    assert main(train) == 0
    capsys.readouterr()

    v1, v2 = _json(capsys, "lineage", "geojepa-GT:1", "--json"), _json(capsys, "lineage", "GT", "--json")
    assert (v1["model"], v1["version"], v2["version"]) == ("geojepa-GT", "1", "2")
    inputs = [{(i["asset"], i["region"]): i for i in v["inputs"]} for v in (v1, v2)]
    for asset in ("tile_shards", "tile_tokens", "tile_images"):
        assert inputs[0][(asset, "t")]["data_version"] != inputs[1][(asset, "t")]["data_version"], asset
    # every input of both versions, the older included, is still in the store
    assert all(i["readable"] for v in inputs for i in v.values()) and v1["checkpoint"]["readable"]
    assert {a for a, _ in inputs[0]} == {"tile_shards", "tile_tokens", "tile_images", "naip_scenes", "tag_embeddings", "geometry_encoder"}
    store = Store(home / "store")
    old_tiles = store.dataset("tiles", "t", inputs[0][("tile_shards", "t")]["data_version"])
    assert sum(pq.read_metadata(old_tiles.path / s["tiles_file"]).num_rows for s in old_tiles.manifest["shards"]) == old_tiles.manifest["n_tiles"]
    # sources: same URI, different sha256; the synthetic scenes of each version by id
    r1, r2 = v1["regions"][0], v2["regions"][0]
    assert r1["osm_uri"] == r2["osm_uri"] == str(src) and r1["osm_sha256"] != r2["osm_sha256"]
    assert r2["osm_sha256"] == store.current_version("osm", "t") and r1["fetched_at"]
    assert r1["imagery_source"] == "synthetic" and r1["scene_ids"] and all(s.startswith("synthetic-") for s in r1["scene_ids"])
    assert v1["dagster_run_id"] and v1["dagster_run_id"] != v2["dagster_run_id"] and v1["run_id"] != v2["run_id"]

    # the other direction: which versions used which region version
    shards1 = inputs[0][("tile_shards", "t")]["data_version"]
    assert [r["version"] for r in _json(capsys, "lineage", "--region", "t", "--json")] == ["1", "2"]
    assert [r["version"] for r in _json(capsys, "lineage", "--region", f"t@{shards1[:8]}", "--json")] == ["1"]
    assert [r["version"] for r in _json(capsys, "lineage", "--region", f"t@{r2['osm_sha256'][:10]}", "--json")] == ["2"]

    assert main(["lineage", "geojepa-GT:1"]) == 0
    text = capsys.readouterr().out
    assert f"dagster run   {v1['dagster_run_id']}" in text and str(src) in text and "MISSING" not in text
    assert main(["lineage", "geojepa-GT:7"]) == 2
    assert "no model version geojepa-GT:7" in capsys.readouterr().err


def test_lineage_spec_errors():
    assert parse_model_spec("GT") == ("geojepa-GT", None) and parse_model_spec("geojepa-TI:3") == ("geojepa-TI", "3")
    with pytest.raises(GeojepaError, match="versions are numbers"):
        parse_model_spec("geojepa-GT:latest")
    assert parse_region_spec("li@abcdef12") == ("li", "abcdef12")
    with pytest.raises(GeojepaError, match="at least 6 hex digits"):
        parse_region_spec("li@xyz")
    with pytest.raises(GeojepaError, match="invalid region name"):
        parse_region_spec("../li")
