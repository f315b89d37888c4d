"""geojepa-pipeline: the GeoJEPA method as a staged Dagster asset graph."""

__version__ = "0.1.0"


def load_embeddings(region: str, variant: str = "GT", home=None, crs: str = "EPSG:4326"):
    """A region's tile embeddings by one model variant as a GeoDataFrame (``stages.embeddings.load_embeddings``)."""
    from .stages.embeddings import load_embeddings as _load

    return _load(region, variant, home=home, crs=crs)
