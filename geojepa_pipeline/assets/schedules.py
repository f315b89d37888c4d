"""One re-ingestion schedule per registered region, built from ``regions.yaml`` when the code loads.

Each schedule materializes ``osm_extract`` and ``naip_scenes`` for its region's partition only;
the rest of the region follows through ``automation.on_upstream_data_change`` when a data
version changed. Changing a region's ``schedule`` in the registry changes the definitions at
the next code-location reload (``Reload`` in the UI, or restarting ``geojepa ui``): no code edits.
"""

import logging
import re

import dagster as dg

from ..regions import Region
from .imagery import naip_scenes
from .osm import osm_extract
from .partitions import regions_partitions

# cron aliases spelled out: Dagster's cron parser wants five fields
CRON_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}

reingest_region_job = dg.define_asset_job(
    "reingest_region",
    selection=dg.AssetSelection.assets(osm_extract, naip_scenes),
    description="Re-fetch one region's OSM extract and imagery; unchanged sources keep their data versions.",
)


def schedule_name(region_name: str) -> str:
    """``reingest_<region>`` with '-' spelled '_' (Dagster names allow [A-Za-z0-9_])."""
    return "reingest_" + re.sub(r"[^A-Za-z0-9_]", "_", region_name)


CRON_HELP = "5 fields (minute hour day-of-month month day-of-week) on days that exist, such as '0 3 * * 1' (weekly), or @daily"


def cron_accepted(expr: str) -> bool:
    """Whether Dagster takes ``expr`` as a schedule's cron (its own validator: '0 3 31 2 *' is refused)."""
    try:
        dg.ScheduleDefinition(name="check", cron_schedule=CRON_ALIASES.get(expr, expr), job_name=reingest_region_job.name)
    except dg.DagsterInvalidDefinitionError:
        return False
    return True


def region_schedule(region: Region, name: str | None = None) -> dg.ScheduleDefinition:
    """The schedule that re-ingests ``region`` on its cron (UTC)."""
    region_name = region.name

    @dg.schedule(
        name=name or schedule_name(region_name),
        cron_schedule=CRON_ALIASES.get(region.schedule, region.schedule),
        job=reingest_region_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-ingest region {region_name} ({region.osm}) on '{region.schedule}' UTC.",
        tags={"geojepa/trigger": "schedule"},
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        if not context.instance.has_dynamic_partition(regions_partitions.name, region_name):
            return dg.SkipReason(f"partition {region_name!r} does not exist yet; region_registry_sensor adds it")
        return dg.RunRequest(partition_key=region_name, tags={"geojepa/region": region_name})

    return _schedule


def region_schedules(regions: dict[str, Region]) -> list[dg.ScheduleDefinition]:
    """One schedule per region; names that would collide after '-' -> '_' get a numeric suffix.

    A region whose cron Dagster refuses (a hand-edited ``regions.yaml``) gets no schedule and one
    warning that names it and says how to fix it; every other region and asset keeps working.
    """
    schedules, used = [], set()
    for region_name in sorted(regions):
        if not cron_accepted(regions[region_name].schedule):
            logging.getLogger(__name__).warning(
                f"region {region_name!r}: schedule {regions[region_name].schedule!r} is not a cron Dagster accepts, so the "
                f"region is not re-ingested on a schedule; give it {CRON_HELP} in regions.yaml")
            continue
        name = schedule_name(region_name)
        suffix = 2
        while name in used:
            name, suffix = f"{schedule_name(region_name)}_{suffix}", suffix + 1
        used.add(name)
        schedules.append(region_schedule(regions[region_name], name))
    return schedules
