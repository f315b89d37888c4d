"""The one ``Definitions`` of the project: ``dagster dev -w workspace.yaml`` loads this."""

from __future__ import annotations

import dagster as dg

from .assets.imagery import naip_scenes, tile_images
from .assets.osm import osm_extract, tile_shards
from .assets.resources import GeojepaResource
from .assets.sensors import region_registry_sensor

ALL_ASSETS = [osm_extract, tile_shards, naip_scenes, tile_images]

defs = dg.Definitions(
    assets=ALL_ASSETS,
    sensors=[region_registry_sensor],
    resources={"geojepa": GeojepaResource()},
)
