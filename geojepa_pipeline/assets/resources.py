"""The one resource that owns IO locations: store root and region registry."""


import dagster as dg

from ..regions import RegionRegistry
from ..settings import get_settings
from ..store import Store


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
