"""The one ``Definitions`` of the project: ``dagster dev -w workspace.yaml`` loads this."""

from __future__ import annotations

import dagster as dg

from .assets.imagery import naip_scenes, tile_images
from .assets.osm import osm_extract, tile_shards
from .assets.resources import GeojepaResource
from .assets.automation import automation_sensor
from .assets.embeddings import tile_embeddings
from .assets.schedules import region_schedules, reingest_region_job
from .assets.sensors import region_registry_sensor, region_source_sensor
from .assets.tokens import geometry_encoder, tag_embeddings, tile_tokens
from .assets.evaluation import evaluation_report
from .assets.training import geojepa_checkpoint
from .regions import default_registry

# the CLI materializes in this order: region assets, then the assets over all regions, then
# the region assets that need those (Dagster's UI and schedules follow the dependencies)
REGION_ASSETS = [osm_extract, tile_shards, naip_scenes, tile_images]  # partitioned by region
GLOBAL_ASSETS = [tag_embeddings, geometry_encoder]  # over all regions, unpartitioned
REGION_TOKEN_ASSETS = [tile_tokens]  # partitioned by region, after GLOBAL_ASSETS
VARIANT_ASSETS = [geojepa_checkpoint, evaluation_report]  # partitioned by model variant, over all regions
REGION_VARIANT_ASSETS = [tile_embeddings]  # partitioned by region x variant, after VARIANT_ASSETS
ALL_ASSETS = REGION_ASSETS + GLOBAL_ASSETS + REGION_TOKEN_ASSETS + VARIANT_ASSETS + REGION_VARIANT_ASSETS
# re-run by themselves when an upstream data version changed (training and evaluation stay manual)
AUTOMATED_ASSETS = [tile_shards, naip_scenes, tile_images, tile_tokens]


def build_definitions(regions: dict | None = None) -> dg.Definitions:
    """The definitions, with one re-ingestion schedule per region of ``regions`` (default: the registry)."""
    if regions is None:
        regions = default_registry().load()
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[reingest_region_job],
        schedules=region_schedules(regions),
        sensors=[region_registry_sensor, region_source_sensor, automation_sensor(dg.AssetSelection.assets(*AUTOMATED_ASSETS))],
        resources={"geojepa": GeojepaResource()},
    )


defs = build_definitions()
