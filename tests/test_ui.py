"""`geojepa ui` serves the same instance the CLI writes to."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from geojepa_pipeline.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_ui_shows_cli_materializations(home, capsys):
    assert main(["regions", "add", "t", "--osm", "pyrosm:test"]) == 0
    assert main(["materialize", "--region", "t"]) == 0
    capsys.readouterr()
    port = _free_port()
    exe = Path(sys.executable).parent / "geojepa"
    log = open(home / "ui.log", "w")
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GEOJEPA_HOME": str(home)}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (home / "ui.log").read_text()[-2000:]
                time.sleep(1)
        else:
            raise AssertionError("dagster dev did not come up:\n" + (home / "ui.log").read_text()[-2000:])
        # `geojepa ui` reports readiness once the health check answers
        deadline = time.time() + 30
        while f"ready: http://127.0.0.1:{port}" not in (home / "ui.log").read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert f"ready: http://127.0.0.1:{port} (health check: http://127.0.0.1:{port}/server_info)" in (home / "ui.log").read_text()
        q = '{ assetOrError(assetKey: {path: ["tile_shards"]}) { ... on Asset { assetMaterializations(limit: 5) { partition } } } }'
        mats = _graphql(port, q)["data"]["assetOrError"]["assetMaterializations"]
        assert [m["partition"] for m in mats] == ["t"]
        nodes = _graphql(port, "{ assetNodes { assetKey { path } partitionKeys } }")["data"]["assetNodes"]
        assert {tuple(n["assetKey"]["path"]): n["partitionKeys"] for n in nodes} == {
            **{(key,): ["t"] for key in ("osm_extract", "tile_shards", "naip_scenes", "tile_images", "tile_tokens")},
            ("tag_embeddings",): [], ("geometry_encoder",): [],  # over all regions
            ("geojepa_checkpoint",): ["T", "GT", "TI", "GTI"],  # one partition per model variant
            ("evaluation_report",): ["T", "GT", "TI", "GTI"],
        }  # the registry's regions are the partitions
        q = '{ assetOrError(assetKey: {path: ["tag_embeddings"]}) { ... on Asset { assetMaterializations(limit: 5) { runId } } } }'
        assert len(_graphql(port, q)["data"]["assetOrError"]["assetMaterializations"]) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
