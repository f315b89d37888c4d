"""The one ``Definitions`` of the project: ``dagster dev -w workspace.yaml`` loads this."""

from __future__ import annotations

import dagster as dg

from .assets.imagery import naip_scenes, tile_images
from .assets.osm import osm_extract, tile_shards
from .assets.resources import GeojepaResource
from .assets.sensors import region_registry_sensor
from .assets.tokens import geometry_encoder, tag_embeddings, tile_tokens
from .assets.evaluation import evaluation_report
from .assets.training import geojepa_checkpoint

# the CLI materializes in this order: region assets, then the assets over all regions, then
# the region assets that need those (Dagster's UI and schedules follow the dependencies)
REGION_ASSETS = [osm_extract, tile_shards, naip_scenes, tile_images]  # partitioned by region
GLOBAL_ASSETS = [tag_embeddings, geometry_encoder]  # over all regions, unpartitioned
REGION_TOKEN_ASSETS = [tile_tokens]  # partitioned by region, after GLOBAL_ASSETS
VARIANT_ASSETS = [geojepa_checkpoint, evaluation_report]  # partitioned by model variant, over all regions
ALL_ASSETS = REGION_ASSETS + GLOBAL_ASSETS + REGION_TOKEN_ASSETS + VARIANT_ASSETS

defs = dg.Definitions(
    assets=ALL_ASSETS,
    sensors=[region_registry_sensor],
    resources={"geojepa": GeojepaResource()},
)
