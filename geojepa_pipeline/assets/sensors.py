"""Sensors: keep the ``regions`` partitions equal to the registry file."""


import dagster as dg

from .partitions import partition_requests, regions_partitions
from .resources import GeojepaResource


@dg.sensor(
    name="region_registry_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds and removes `regions` partitions as regions.yaml changes.",
)
def region_registry_sensor(context: dg.SensorEvaluationContext, geojepa: GeojepaResource) -> dg.SensorResult:
    names = geojepa.registry().load().keys()
    existing = context.instance.get_dynamic_partitions(regions_partitions.name)
    requests = partition_requests(names, existing)
    if not requests:
        return dg.SensorResult(skip_reason="registry and partitions agree")
    return dg.SensorResult(dynamic_partitions_requests=requests)
