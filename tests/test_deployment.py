"""The deployment's topology started for real on 127.0.0.1: PostgreSQL, MLflow server (PostgreSQL backend),
``dagster code-server``, ``dagster-webserver`` and ``dagster-daemon`` on docker/dagster.yaml (run launcher
swapped), driven through the GraphQL API."""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from geojepa_pipeline.regions import Region, RegionRegistry

from .services import Service, free_port, postgres_bindir, postgres_server

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ci_instance_config() -> dict:
    """docker/dagster.yaml with the one change CI needs: no Docker engine, so runs start as local processes."""
    doc = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
    return {**doc, "run_launcher": {"module": "dagster.core.launcher", "class": "DefaultRunLauncher"}}


def ci_workspace(port: int) -> dict:
    """docker/workspace.yaml with the code server's host name and port on loopback."""
    doc = yaml.safe_load((REPO / "docker" / "workspace.yaml").read_text())
    doc["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=port)
    return doc


def test_ci_config_differs_from_docker_only_in_hosts_and_launcher():
    docker = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
    ci = ci_instance_config()
    assert {k for k in docker if docker[k] != ci[k]} == {"run_launcher"}
    assert docker["run_launcher"]["class"] == "DockerRunLauncher" and docker["run_launcher"]["config"]["container_kwargs"]["auto_remove"]
    assert docker["run_coordinator"]["class"] == "QueuedRunCoordinator" and docker["concurrency"]["pools"]["default_limit"] == 1
    assert "postgres" in docker["storage"] and all(
        isinstance(v, dict) and set(v) == {"env"} for v in docker["storage"]["postgres"]["postgres_db"].values())
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"postgres", "mlflow", "user_code", "dagster_webserver", "dagster_daemon"}
    assert all("healthcheck" in s for n, s in compose["services"].items() if n != "user_code")  # user_code: in its image
    # secrets only from the environment: every password/secret setting is empty or a reference
    files = [*(REPO / "docker").iterdir(), REPO / ".env.example"]
    settings = [m for f in files for m in re.finditer(r"(?i)\b\w*(password|secret)\w*\s*[:=][ \t]*([^\s#]*)", f.read_text())]
    assert len(settings) >= 5
    assert all(m.group(2) in ("", '""') or m.group(2).startswith(("${", "{env")) for m in settings), [m.group(0) for m in settings]


def _wait_run(client, run_id: str, service: Service, timeout_s: float = 420) -> str:
    from dagster import DagsterRunStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_run_status(run_id)
        if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            return status.value
        service.check_alive()  # a dead daemon never finishes the run
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s:.0f} s:\n{service.tail()}")


def test_assets_through_graphql_on_postgres_and_mlflow_server(tmp_path, home):
    if postgres_bindir() is None:
        if os.environ.get("GEOJEPA_REQUIRE_E2E"):
            pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does this)")
        pytest.skip("PostgreSQL is not installed: apt-get install -y postgresql, or run .ci/run")
    import psycopg2
    from dagster_graphql import DagsterGraphQLClient
    from mlflow.tracking import MlflowClient

    RegionRegistry(home / "regions.yaml").add(Region.create("t", "pyrosm:test", imagery="none"))
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(ci_instance_config()))
    code_port, web_port, mlflow_port = free_port(), free_port(), free_port()
    (dagster_home / "workspace.yaml").write_text(yaml.safe_dump(ci_workspace(code_port)))
    services: list[Service] = []
    with postgres_server() as pg:
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "GEOJEPA_HOME": str(home),
               "DAGSTER_PG_HOST": pg["host"], "DAGSTER_PG_PORT": str(pg["port"]), "DAGSTER_PG_USER": pg["user"],
               "DAGSTER_PG_PASSWORD": "unused-with-trust-auth", "DAGSTER_PG_DB": "dagster",
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "DAGSTER_DISABLE_TELEMETRY": "1"}
        try:
            start = lambda name, *cmd: services.append(Service(name, [str(c) for c in cmd], tmp_path, env, cwd=dagster_home)) or services[-1]  # noqa: E731
            mlflow = start("mlflow", BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", mlflow_port,
                           "--backend-store-uri", f"postgresql://geojepa@127.0.0.1:{pg['port']}/mlflow",
                           "--artifacts-destination", tmp_path / "mlartifacts", "--workers", "1")
            start("code_server", BIN / "dagster", "code-server", "start", "-h", "127.0.0.1", "-p", code_port,
                  "-m", "geojepa_pipeline.definitions")
            web = start("webserver", BIN / "dagster-webserver", "-h", "127.0.0.1", "-p", web_port, "-w", dagster_home / "workspace.yaml")
            daemon = start("daemon", BIN / "dagster-daemon", "run", "-w", dagster_home / "workspace.yaml")
            web.wait_http(f"http://127.0.0.1:{web_port}/server_info")
            mlflow.wait_http(f"http://127.0.0.1:{mlflow_port}/health")
            client = DagsterGraphQLClient("127.0.0.1", port_number=web_port)

            # the registry sensor, running in the daemon, adds the region's partition
            partitions = '{ assetNodeOrError(assetKey: {path: ["tile_shards"]}) { ... on AssetNode { partitionKeys } } }'
            daemon.wait_until(lambda: client._execute(partitions)["assetNodeOrError"]["partitionKeys"] == ["t"],
                              "partition 't' added by region_registry_sensor")

            def launch(assets, tags=None, run_config=None):
                run_id = client.submit_job_execution("__ASSET_JOB", asset_selection=assets, tags=tags or {}, run_config=run_config)
                status = _wait_run(client, run_id, daemon)
                assert status == "SUCCESS", f"{assets}: {status}\n{daemon.tail()}"
                return run_id

            region = {"dagster/partition": "t"}
            runs = [launch(["osm_extract", "tile_shards", "naip_scenes", "tile_images"], region),
                    launch(["tag_embeddings", "geometry_encoder"]),
                    launch(["tile_tokens"], region)]
            train_config = {"ops": {"geojepa_checkpoint": {"config": {"preset": "tiny", "epochs": 2, "ckpt_every": 1000}}}}
            runs.append(launch(["geojepa_checkpoint"], {"dagster/partition": "GT"}, train_config))

            # the runs and their materializations are in PostgreSQL
            with psycopg2.connect(host=pg["host"], port=pg["port"], user="geojepa", dbname="dagster") as conn, conn.cursor() as cur:
                cur.execute("SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (runs,))
                assert dict(cur.fetchall()) == {r: "SUCCESS" for r in runs}
                cur.execute("SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND run_id = ANY(%s)", (runs,))
                materialized = {row[0] for row in cur.fetchall()}
            assert {f'["{k}"]' for k in ("osm_extract", "tile_shards", "naip_scenes", "tile_images", "tag_embeddings",
                                         "geometry_encoder", "tile_tokens", "geojepa_checkpoint")} <= materialized

            # the MLflow server lists the registered version with its lineage tags, naming the Dagster run
            version = MlflowClient(f"http://127.0.0.1:{mlflow_port}").get_model_version("geojepa-GT", "1")
            assert version.tags["dagster.run_id"] == runs[-1] and version.tags["input.tile_shards/t"]
            assert version.tags["input.osm_sha256/t"] and version.tags["input.tag_embeddings"]
            # the materialization links to the MLflow run over HTTP
            q = '{ assetOrError(assetKey: {path: ["geojepa_checkpoint"]}) { ... on Asset { assetMaterializations(limit: 1) { metadataEntries { label ... on UrlMetadataEntry { url } } } } } }'
            entries = client._execute(q)["assetOrError"]["assetMaterializations"][0]["metadataEntries"]
            url = next(e["url"] for e in entries if e["label"] == "mlflow_run")
            assert url.startswith(f"http://127.0.0.1:{mlflow_port}/#/experiments/") and url.endswith(version.run_id)
        except BaseException:
            for s in services:
                print(f"===== {s.name} =====\n{s.tail(4000)}")
            raise
        finally:
            for s in reversed(services):
                s.stop()
