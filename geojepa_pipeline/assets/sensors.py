"""Sensors: keep the ``regions`` partitions equal to the registry, and re-ingest regions whose source changed."""


import hashlib
import json

import dagster as dg

from ..errors import GeojepaError
from ..stages.osm import check_source
from ..store import OSM
from .osm import osm_extract
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


def _run_key(region: str, current_sha: str | None, fingerprint: dict) -> str:
    """One run per (region, ingested version, observed source state): a failing source is not re-requested every tick."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return f"{region}:{(current_sha or 'none')[:12]}:{digest}"


@dg.sensor(
    name="region_source_sensor",
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[osm_extract],
    description="Re-ingests a region when its OSM source changed: local files by size/mtime then sha256, "
                "http(s) by ETag or Last-Modified (HEAD). Only the changed regions run.",
)
def region_source_sensor(context: dg.SensorEvaluationContext, geojepa: GeojepaResource) -> dg.SensorResult:
    # cursor: {region: {"fingerprint": {...}, "sha256": str|None}}: the last look at each source,
    # so an unchanged local file whose mtime moved is hashed once, not on every tick
    cursor = json.loads(context.cursor) if context.cursor else {}
    store, regions = geojepa.store(), geojepa.registry().load()
    partitions = set(context.instance.get_dynamic_partitions(regions_partitions.name))
    new_cursor, requests, seen = {}, [], []
    for name in sorted(regions):
        if name not in partitions:
            seen.append(f"{name}: waiting for its partition")
            continue
        try:
            check = check_source(regions[name], store, cursor.get(name))
        except GeojepaError as exc:
            context.log.warning(f"region {name}: {exc}")
            seen.append(f"{name}: {exc}")
            if name in cursor:
                new_cursor[name] = cursor[name]
            continue
        new_cursor[name] = {"fingerprint": check.fingerprint, "sha256": check.sha256}
        seen.append(f"{name}: {check.reason}")
        if check.changed and not check.never_ingested:  # a source that changed since it was ingested
            context.log.info(f"region {name}: {check.reason}; requesting osm_extract[{name}]")
            requests.append(dg.RunRequest(
                run_key=_run_key(name, store.current_version(OSM, name), check.fingerprint),
                partition_key=name, asset_selection=[osm_extract.key],
                tags={"geojepa/trigger": "source_sensor", "geojepa/region": name, "geojepa/reason": check.reason[:200]},
            ))
    return dg.SensorResult(
        run_requests=requests, cursor=json.dumps(new_cursor, sort_keys=True),
        skip_reason=None if requests else ("; ".join(seen) or "no regions registered")[:1000],
    )
