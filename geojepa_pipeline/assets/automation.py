"""When region assets re-run by themselves: only when an upstream *data version* changed.

``AutomationCondition.eager()`` re-runs an asset after any new materialization of a parent.
A weekly re-ingestion of an unchanged extract materializes ``osm_extract`` again with the same
data version (its sha256), and eager would then redo every tile, chip and token. This
condition asks instead whether a parent's data version changed since the last tick, so an
unchanged source costs one hash and nothing downstream runs.
"""


import dagster as dg

AC = dg.AutomationCondition


def on_upstream_data_change() -> dg.AutomationCondition:
    """eager(), with "a parent was materialized" narrowed to "a parent's data version changed"."""
    parent_changed = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_version_changed_without_root")
        | AC.will_be_requested()
    ).with_label("any_deps_data_version_changed")
    return (
        (AC.newly_missing() | parent_changed).since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("on_upstream_data_change")


def automation_sensor(target) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates the region assets' conditions (running by default, every 30 s)."""
    return dg.AutomationConditionSensorDefinition(
        "region_automation", target=target, default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30,
        description="Re-materializes tile_shards, naip_scenes, tile_images and tile_tokens of a region when an upstream "
                    "data version changed (not on every upstream run).",
    )
