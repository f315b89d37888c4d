"""The one resource that owns IO locations: store root and region registry."""


import dagster as dg

from ..regions import RegionRegistry
from ..settings import get_settings
from ..store import TILES, Store


class GeojepaResource(dg.ConfigurableResource):
    """Where the store and the registry live. Empty ``home`` means ``GEOJEPA_HOME`` / the default."""

    home: str = ""

    def _settings(self):
        return get_settings(self.home or None)

    def store(self) -> Store:
        settings = self._settings()
        return Store(settings.store_root, cache=settings.store_cache)

    def registry(self) -> RegionRegistry:
        return RegionRegistry(self._settings().registry_path)

    def regions_with_tiles(self) -> tuple[list[str], list[str]]:
        """(registered regions that have tile_shards, registered regions that do not), sorted."""
        store = self.store()
        registered = sorted(self.registry().load())
        with_tiles = [r for r in registered if store.current_version(TILES, r)]
        return with_tiles, [r for r in registered if r not in with_tiles]
