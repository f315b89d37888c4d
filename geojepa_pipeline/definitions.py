"""The one ``Definitions`` of the project: ``dagster dev -w workspace.yaml`` loads this."""

from __future__ import annotations

import dagster as dg

from .assets.imagery import naip_scenes, tile_images
from .assets.osm import osm_extract, tile_shards
from .assets.resources import GeojepaResource
from .assets.sensors import region_registry_sensor
from .assets.tokens import tag_embeddings

REGION_ASSETS = [osm_extract, tile_shards, naip_scenes, tile_images]  # partitioned by region
GLOBAL_ASSETS = [tag_embeddings]  # over all regions, unpartitioned
ALL_ASSETS = REGION_ASSETS + GLOBAL_ASSETS

defs = dg.Definitions(
    assets=ALL_ASSETS,
    sensors=[region_registry_sensor],
    resources={"geojepa": GeojepaResource()},
)
