"""The Dagster layer: thin assets over the pure modules, plus partitions, resources, sensors."""
