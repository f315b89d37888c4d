"""`geojepa ui` serves the same instance the CLI writes to."""

import json
import os
import sys
import urllib.request
from pathlib import Path

from geojepa_pipeline.cli import main

from .services import Service, free_port


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_ui_shows_cli_materializations(home, capsys):
    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 0
    assert main(["materialize", "--region", "t", "--epochs", "2"]) == 0
    capsys.readouterr()
    port = free_port()
    exe = Path(sys.executable).parent / "geojepa"
    ui = Service("ui", [str(exe), "ui", "--port", str(port)], home, {**os.environ, "GEOJEPA_HOME": str(home)})
    try:
        ui.wait_http(f"http://127.0.0.1:{port}/server_info", timeout_s=120)
        # `geojepa ui` reports readiness once the health check answers
        ui.wait_until(lambda: f"ready: http://127.0.0.1:{port}" in ui.tail(100_000), "the readiness line", timeout_s=30)
        assert f"ready: http://127.0.0.1:{port} (health check: http://127.0.0.1:{port}/server_info)" in ui.tail(100_000)
        q = '{ assetOrError(assetKey: {path: ["tile_shards"]}) { ... on Asset { assetMaterializations(limit: 5) { partition } } } }'
        mats = _graphql(port, q)["data"]["assetOrError"]["assetMaterializations"]
        assert [m["partition"] for m in mats] == ["t"]
        nodes = _graphql(port, "{ assetNodes { assetKey { path } partitionKeys } }")["data"]["assetNodes"]
        keys = {tuple(n["assetKey"]["path"]): n["partitionKeys"] for n in nodes}
        assert sorted(keys.pop(("tile_embeddings",))) == sorted(f"t|{v}" for v in ("T", "GT", "TI", "GTI"))  # region x variant
        assert keys == {
            **{(key,): ["t"] for key in ("osm_extract", "tile_shards", "naip_scenes", "tile_images", "tile_tokens")},
            ("tag_embeddings",): [], ("geometry_encoder",): [],  # over all regions
            ("geojepa_checkpoint",): ["T", "GT", "TI", "GTI"],  # one partition per model variant
            ("evaluation_report",): ["T", "GT", "TI", "GTI"],
        }  # the registry's regions are the partitions
        q = '{ assetOrError(assetKey: {path: ["tag_embeddings"]}) { ... on Asset { assetMaterializations(limit: 5) { runId } } } }'
        assert len(_graphql(port, q)["data"]["assetOrError"]["assetMaterializations"]) == 1
    finally:
        ui.stop()
