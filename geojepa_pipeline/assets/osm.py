"""``osm_extract[region]`` and ``tile_shards[region]``: thin wrappers over ``stages.osm``."""


import dagster as dg

from ..geo.render import png_markdown, tile_density_png
from ..stages.osm import ShardCheck, TileShardsOptions, build_tile_shards, current_extract, fetch_extract
from .automation import on_upstream_data_change
from .config import config_from
from .partitions import regions_partitions
from .results import dataset_result
from .resources import GeojepaResource

OSM_EXTRACT_CODE_VERSION = "1"
TILE_SHARDS_CODE_VERSION = "3"  # 2: relation_members.parquet beside the shards; 3: zero-length lines are points


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


def _check_result(check: ShardCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=check.name, passed=check.passed, metadata=check.metadata)


@dg.asset(
    automation_condition=on_upstream_data_change(),
    partitions_def=regions_partitions,
    deps=[osm_extract],
    code_version=TILE_SHARDS_CODE_VERSION,
    group_name="ingest",
    kinds={"parquet"},
    description="Every tagged OSM feature clipped to 300 m UTM tiles: Parquet shards (tiles + entity pieces) with a manifest.",
    check_specs=[
        # blocking: when one fails, nothing downstream runs on these shards in that run
        dg.AssetCheckSpec("schema", asset="tile_shards", blocking=True,
                          description="Shards have the expected Arrow schema and GeoParquet metadata."),
        dg.AssetCheckSpec("entity_accounting", asset="tile_shards", blocking=True,
                          description="Input features = features in tiles + dropped (by reason)."),
        dg.AssetCheckSpec("clipped_area", asset="tile_shards", blocking=True,
                          description="Polygons wholly inside the extract: clipped areas sum to the original (rel. err <= 1e-6)."),
        dg.AssetCheckSpec("valid_geometry", asset="tile_shards", blocking=True,
                          description="Every piece, as written, is a valid geometry for GEOS (shapely.is_valid)."),
    ],
)
def tile_shards(context: dg.AssetExecutionContext, config: TileShardsConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    region = context.partition_key
    store = geojepa.store()
    extract_path, sha = current_extract(store, region)
    entry = geojepa.registry().load().get(region)
    result = build_tile_shards(
        region, store, extract_path=extract_path, source={"sha256": sha, "uri": entry.osm if entry else None},
        log=context.log.info, clip=entry.clip_area() if entry else None, **config.model_dump(),
    )
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
    return dataset_result(
        ds, {
            "epsg": dg.MetadataValue.int(tiled.epsg),
            "n_tiles": dg.MetadataValue.int(manifest["n_tiles"]),
            "n_pieces": dg.MetadataValue.int(manifest["n_pieces"]),
            "n_entities": dg.MetadataValue.int(acc["n_entities_kept"]),
            "n_input_features": dg.MetadataValue.int(acc["n_input"]),
            "dropped": dg.MetadataValue.json(acc["dropped"]),
            "repaired": dg.MetadataValue.json(acc["repaired"]),
            "n_shards": dg.MetadataValue.int(len(manifest["shards"])),
            "clip": dg.MetadataValue.json(manifest.get("clip")),
            "bytes": dg.MetadataValue.int(total_bytes),
            "source_sha256": dg.MetadataValue.text(sha),
            "timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
            "tile_density": dg.MetadataValue.md(png_markdown(png, f"entities per tile, {region}")),
        },
        check_results=[_check_result(c) for c in result.checks],
    )
