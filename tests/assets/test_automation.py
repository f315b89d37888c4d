"""No change, no work: the source sensor, the region schedules and the automation ticks on a real Dagster instance."""

import os

import dagster as dg

from geojepa_pipeline.assets.partitions import sync_region_partitions
from geojepa_pipeline.assets.resources import GeojepaResource
from geojepa_pipeline.assets.schedules import region_schedules
from geojepa_pipeline.assets.sensors import region_source_sensor
from geojepa_pipeline.definitions import ALL_ASSETS, AUTOMATED_ASSETS, build_definitions
from geojepa_pipeline.regions import Region, RegionRegistry

from ..osm_fixtures import rules_fixture, write_pbf

AUTOMATED_KEYS = {k for a in AUTOMATED_ASSETS for k in a.keys}


def _materialize(instance, home, region, selection):
    result = dg.materialize(ALL_ASSETS, instance=instance, partition_key=region, selection=selection,
                            resources={"geojepa": GeojepaResource(home=str(home))})
    assert result.success
    return result


def _sense(instance, home, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"geojepa": GeojepaResource(home=str(home))})
    return region_source_sensor(ctx)


def _requested(result) -> dict[str, set]:
    """{asset name: requested partitions} of one automation tick."""
    out = {k.to_user_string(): set(result.get_requested_partitions(k)) for k in AUTOMATED_KEYS}
    return {k: v for k, v in out.items() if v}


def test_changed_source_reingests_exactly_its_region_and_unchanged_costs_nothing(home, tmp_path):
    src_a = rules_fixture(tmp_path / "a.osm.pbf")
    src_b = write_pbf(tmp_path / "b.osm.pbf", nodes=[(1, 9.55, 47.16, {"amenity": "cafe"}), (2, 9.56, 47.16, {"shop": "bakery"})])
    registry = RegionRegistry(home / "regions.yaml")
    registry.add(Region.create("a", str(src_a), imagery="none"))
    registry.add(Region.create("b", str(src_b), imagery="none"))
    defs = build_definitions(registry.load())
    everything = dg.AssetSelection.groups("ingest", "imagery", "tokens")
    with dg.instance_for_test() as instance:
        sync_region_partitions(instance, ["a", "b"])
        # a region never ingested is left to the user or its schedule: the sensor only reacts to changes
        fresh = _sense(instance, home, None)
        assert fresh.run_requests == [] and "a: never ingested" in fresh.skip_reason.skip_message
        for region in ("a", "b"):
            _materialize(instance, home, region, everything)
        baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert baseline.total_requested == 0

        # nothing changed: no run, and the cursor remembers what each source looked like
        quiet = _sense(instance, home, None)
        assert quiet.run_requests == [] and "a: unchanged (same size and mtime)" in quiet.skip_reason.skip_message
        # b touched (mtime moved, same bytes): hashed, still no run
        st = src_b.stat()
        os.utime(src_b, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
        touched = _sense(instance, home, quiet.cursor)
        assert touched.run_requests == [] and "b: unchanged (mtime changed, same sha256)" in touched.skip_reason.skip_message

        # the weekly schedule re-ingests unchanged b: same data versions, so the automation tick requests nothing
        schedule = next(s for s in defs.schedules if s.name == "reingest_b")
        with dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
            request = schedule.evaluate_tick(ctx).run_requests[0]
        assert request.partition_key == "b"
        reingest = defs.resolve_job_def("reingest_region")
        assert {k.to_user_string() for k in reingest.asset_layer.selected_asset_keys} == {"osm_extract", "naip_scenes"}
        assert reingest.execute_in_process(instance=instance, partition_key="b", resources={"geojepa": GeojepaResource(home=str(home))}).success
        after_unchanged = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=baseline.cursor)
        assert after_unchanged.total_requested == 0

        # a changes: the sensor asks for osm_extract[a] only
        write_pbf(src_a, nodes=[(1, 9.52, 47.14, {"amenity": "bench"}), (5, 9.521, 47.141, {"amenity": "school"})])
        changed = _sense(instance, home, touched.cursor)
        assert [(r.partition_key, r.asset_selection) for r in changed.run_requests] == [("a", [dg.AssetKey("osm_extract")])]
        assert changed.run_requests[0].tags["geojepa/reason"].startswith("content changed (sha256 ")
        _materialize(instance, home, "a", dg.AssetSelection.assets("osm_extract"))
        # ... and the tick re-runs a's downstream assets, not b's
        after_change = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after_unchanged.cursor)
        assert _requested(after_change) == {k.to_user_string(): {"a"} for k in AUTOMATED_KEYS}
        # once ingested, the sensor sees a as current again
        assert _sense(instance, home, changed.cursor).run_requests == []


def test_schedules_follow_the_registry(home, tmp_path):
    src = rules_fixture(tmp_path / "a.osm.pbf")
    registry = RegionRegistry(home / "regions.yaml")
    registry.add(Region.create("north-west", str(src)))
    registry.add(Region.create("north_west", str(src), schedule="@daily"))
    registry.add(Region.create("c", str(src), schedule="15 2 * * Sun"))
    schedules = {s.name: s.cron_schedule for s in region_schedules(registry.load())}
    assert schedules == {"reingest_c": "15 2 * * Sun", "reingest_north_west": "0 3 * * 1", "reingest_north_west_2": "0 0 * * *"}
    registry.remove("north-west")
    registry.add(Region.create("c", str(src), schedule="0 4 1 * *"), replace=True)
    defs = build_definitions(registry.load())
    assert {s.name: s.cron_schedule for s in defs.schedules} == {"reingest_c": "0 4 1 * *", "reingest_north_west": "0 0 * * *"}
    # a region whose partition the registry sensor has not added yet is skipped, not failed
    with dg.instance_for_test() as instance, dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()) as ctx:
        skipped = defs.resolve_schedule_def("reingest_c").evaluate_tick(ctx)
    assert not skipped.run_requests and "does not exist yet" in skipped.skip_message
