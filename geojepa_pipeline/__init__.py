"""geojepa-pipeline: the GeoJEPA method as a staged Dagster asset graph."""

__version__ = "0.1.0"
