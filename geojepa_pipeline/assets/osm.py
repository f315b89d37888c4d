"""``osm_extract[region]`` and ``tile_shards[region]``: thin wrappers over ``stages.osm``.

``tile_shards`` is a graph of three ops: ``tile_shards_plan`` yields one unit per block (a dynamic fan-out; one unit,
the whole file, below ``block_min_mb``), ``tile_shards_unit`` tiles each (retried alone), ``tile_shards_commit``
merges and checks them. Partitions by block were the other choice: they would list thousands of block partitions
per region in the UI, known only after planning, and leave the merge to a second asset.
"""

import multiprocessing
import os


import dagster as dg

from ..geo.render import png_markdown, tile_density_png
from ..geo.blocks import log_plan
from ..stages.osm import (ShardCheck, TileShardsOptions, commit_tile_shards, current_extract, fetch_extract,
                           plan_tile_shards, tile_unit)
from .automation import on_upstream_data_change
from .config import config_from
from .partitions import regions_partitions
from .results import dataset_metadata
from .resources import GeojepaResource

OSM_EXTRACT_CODE_VERSION = "1"
TILE_SHARDS_CODE_VERSION = "3"  # 2: relation_members.parquet beside the shards; 3: zero-length lines are points


def _output_with_version(data_version: str, metadata: dict) -> dg.Output:
    """The commit op's output: a graph-backed asset takes its data version from it. ``Output(data_version=)`` is
    marked beta in Dagster 1.13, and it is the only way there: its warning is not the user's concern."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(None, "result", data_version=dg.DataVersion(data_version), metadata=metadata)


@dg.asset(
    partitions_def=regions_partitions,
    code_version=OSM_EXTRACT_CODE_VERSION,
    group_name="ingest",
    kinds={"osm"},
    description="The region's .osm.pbf, copied or downloaded into the store, validated, content-addressed by sha256.",
)
def osm_extract(context: dg.AssetExecutionContext, geojepa: GeojepaResource) -> dg.MaterializeResult:
    region = geojepa.registry().get(context.partition_key)
    result = fetch_extract(region, geojepa.store(), log=context.log.info)
    summary = result.summary
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={
            "source_uri": dg.MetadataValue.text(result.uri),
            "sha256": dg.MetadataValue.text(result.sha256),
            "bytes": dg.MetadataValue.int(result.bytes),
            "path": dg.MetadataValue.path(str(result.path)),
            "unchanged": dg.MetadataValue.bool(result.reused),
            "header_bbox_lonlat": dg.MetadataValue.json(list(summary.bbox_lonlat) if summary.bbox_lonlat else None),
            "header_timestamp": dg.MetadataValue.text(summary.timestamp or "unknown"),
            "n_relations": dg.MetadataValue.int(summary.n_relations),
        },
    )


TileShardsConfig = config_from("TileShardsConfig", TileShardsOptions)

# a block that failed (a pod evicted, a node lost) is tried again alone; the blocks done stay done
UNIT_RETRY = dg.RetryPolicy(max_retries=2, delay=5)
_CHECKS = (
    # blocking: when one fails, nothing downstream runs on these shards in that run
    dg.AssetCheckSpec("schema", asset="tile_shards", blocking=True,
                      description="Shards have the expected Arrow schema and GeoParquet metadata."),
    dg.AssetCheckSpec("entity_accounting", asset="tile_shards", blocking=True,
                      description="Input features = features in tiles + dropped (by reason)."),
    dg.AssetCheckSpec("clipped_area", asset="tile_shards", blocking=True,
                      description="Polygons wholly inside the extract: clipped areas sum to the original (rel. err <= 1e-6)."),
    dg.AssetCheckSpec("valid_geometry", asset="tile_shards", blocking=True,
                      description="Every piece, as written, is a valid geometry for GEOS (shapely.is_valid)."),
)


def _check_result(check: ShardCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=check.name, passed=check.passed, metadata=check.metadata)


@dg.op(ins={"osm_extract": dg.In(dg.Nothing)}, out={"plan": dg.Out(), "units": dg.DynamicOut(int)},
       description="Decide how the extract is cut; by blocks, spill it and write each block's share (geo.blocks).")
def tile_shards_plan(context: dg.OpExecutionContext, config: TileShardsConfig, geojepa: GeojepaResource):
    region = context.partition_key
    store = geojepa.store()
    extract_path, sha = current_extract(store, region)
    entry = geojepa.registry().load().get(region)
    plan = plan_tile_shards(region, store, extract_path=extract_path, source={"sha256": sha, "uri": entry.osm if entry else None},
                            log=context.log.info, clip=entry.clip_area() if entry else None, run_id=context.run_id,
                            **config.model_dump())
    if plan.blocks is not None:
        log_plan(plan.blocks, region, context.log.info, "a step per block")
    yield dg.Output(plan, "plan", metadata={"n_units": len(plan.units), "work": dg.MetadataValue.path(str(plan.work))})
    for unit in plan.units:
        yield dg.DynamicOutput(unit, output_name="units", mapping_key=plan.unit_key(unit))


def _injected_failure(key: str, attempt: int) -> str | None:
    """``GEOJEPA_FAIL_UNITS=block_00001,whole@0``: a drill of retries and of re-execution from failure. A unit
    listed fails (``@N``: only on attempt N)."""
    for item in filter(None, os.environ.get("GEOJEPA_FAIL_UNITS", "").split(",")):
        name, _, at = item.strip().partition("@")
        if name == key and (not at or int(at) == attempt):
            return f"GEOJEPA_FAIL_UNITS={item}"
    return None


@dg.op(retry_policy=UNIT_RETRY, description="Tile one unit: the whole file, or one block's share (its pieces spilled).")
def tile_shards_unit(context: dg.OpExecutionContext, plan, unit: int):
    key = plan.unit_key(unit)
    drill = _injected_failure(key, context.retry_number)
    if drill:
        raise RuntimeError(f"tile_shards[{plan.region}] {key}: failed on purpose ({drill})")
    # a step of the multiprocess executor shares the machine with its sibling steps: one tiling process each;
    # under the in-process executor (geojepa materialize) every block runs in the run's one process: a fresh
    # fork per block keeps that process from growing block by block (16x16: 2,513 MB peak before)
    in_step_process = multiprocessing.parent_process() is not None
    workers = 1 if plan.blocks is not None and in_step_process else plan.options.workers
    return tile_unit(plan, unit, workers=workers, log=context.log.info, own_process=not in_step_process)


@dg.op(out={"result": dg.Out(dg.Nothing), **{spec.get_python_identifier(): dg.Out(dg.Nothing, is_required=False) for spec in _CHECKS}},
       description="Merge the units, write the shards, run the checks; CURRENT moves only when they pass.")
def tile_shards_commit(context: dg.OpExecutionContext, plan, results: list, geojepa: GeojepaResource):
    region = plan.region
    result = commit_tile_shards(plan, geojepa.store(), results, log=context.log.info)
    ds, tiled, manifest = result.dataset, result.tiled, result.manifest
    if result.failed_checks:  # blocking: this run stops here, and the store keeps the last version that passed
        context.log.warning(
            f"tile_shards[{region}]@{ds.data_version} failed {', '.join(result.failed_checks)}: CURRENT stays at "
            f"{result.current or 'nothing (no version passed yet)'}; see the check's metadata in the UI")
    tiles = tiled.tiles
    png = tile_density_png(
        tiles.column("tile_x").to_numpy(), tiles.column("tile_y").to_numpy(), tiles.column("n_entities").to_numpy(),
        title=f"{region} EPSG:{tiled.epsg}",
    )
    total_bytes = sum(f["bytes"] for f in manifest["files"].values())
    acc = tiled.accounting()
    yield _output_with_version(ds.data_version, dataset_metadata(ds, {
        "epsg": dg.MetadataValue.int(tiled.epsg),
        "n_tiles": dg.MetadataValue.int(manifest["n_tiles"]),
        "n_pieces": dg.MetadataValue.int(manifest["n_pieces"]),
        "n_entities": dg.MetadataValue.int(acc["n_entities_kept"]),
        "n_input_features": dg.MetadataValue.int(acc["n_input"]),
        "dropped": dg.MetadataValue.json(acc["dropped"]),
        "repaired": dg.MetadataValue.json(acc["repaired"]),
        "n_shards": dg.MetadataValue.int(len(manifest["shards"])),
        "clip": dg.MetadataValue.json(manifest.get("clip")),
        "ingestion": dg.MetadataValue.json(manifest.get("ingestion") or {"by_blocks": False}),
        "bytes": dg.MetadataValue.int(total_bytes),
        "source_sha256": dg.MetadataValue.text(plan.source.get("sha256") or ""),
        "timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
        "tile_density": dg.MetadataValue.md(png_markdown(png, f"entities per tile, {region}")),
    }))
    for check in result.checks:
        yield _check_result(check)


def _plan_config(config: dict) -> dict:
    return {"tile_shards_plan": {"config": dict(config)}}


@dg.graph_asset(
    automation_condition=on_upstream_data_change(),
    partitions_def=regions_partitions,
    ins={"osm_extract": dg.AssetIn(dagster_type=dg.Nothing)},
    code_version=TILE_SHARDS_CODE_VERSION,
    group_name="ingest",
    kinds={"parquet"},
    description="Every tagged OSM feature clipped to 300 m UTM tiles: Parquet shards (tiles + entity pieces) with a manifest. "
                "Ops: plan, then one step per unit (the whole file, or each spatial block: retried alone), then commit.",
    check_specs=list(_CHECKS),
    config=dg.ConfigMapping(config_fn=_plan_config, config_schema=TileShardsConfig.to_config_schema()),
)
def tile_shards(osm_extract):
    plan, units = tile_shards_plan(osm_extract)
    results = units.map(lambda unit: tile_shards_unit(plan, unit)).collect()
    result, *checks = tile_shards_commit(plan, results)
    return {"result": result, **{spec.get_python_identifier(): out for spec, out in zip(_CHECKS, checks)}}
