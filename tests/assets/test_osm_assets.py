import dagster as dg

from geojepa_pipeline.assets.partitions import regions_partitions, sync_region_partitions
from geojepa_pipeline.assets.resources import GeojepaResource
from geojepa_pipeline.assets.sensors import region_registry_sensor
from geojepa_pipeline.definitions import ALL_ASSETS
from geojepa_pipeline.regions import Region, RegionRegistry
from geojepa_pipeline.store import Store

from ..conftest import visible_datasets


def _materialize(instance, home, region):
    """Everything up to the tokens for one region (the model is partitioned by variant: test_training_asset)."""
    selection = dg.AssetSelection.groups("ingest", "imagery", "tokens")
    return dg.materialize(ALL_ASSETS, instance=instance, partition_key=region, selection=selection,
                          resources={"geojepa": GeojepaResource(home=str(home))})


def _latest(instance, key, region):
    ev = instance.get_latest_materialization_event(dg.AssetKey(key))
    mat = ev.asset_materialization
    assert mat.partition == region
    return mat


def test_materialize_twice_gives_the_same_data_versions(home):
    RegionRegistry(home / "regions.yaml").add(Region.create("t", "pyrosm:test"))
    with dg.DagsterInstance.ephemeral() as instance:
        sync_region_partitions(instance, ["t"])
        first = _materialize(instance, home, "t")
        assert first.success
        checks = first.get_asset_check_evaluations()
        assert {c.check_name: c.passed for c in checks} == {
            "schema": True, "entity_accounting": True, "clipped_area": True, "valid_geometry": True,
            "aligned_with_tiles": True, "aligned_with_entities": True}
        tiles_meta = _latest(instance, "tile_shards", "t").metadata
        extract_meta = _latest(instance, "osm_extract", "t").metadata
        assert tiles_meta["n_tiles"].value > 10 and tiles_meta["epsg"].value == 32635
        assert tiles_meta["tile_density"].value.startswith("![entities per tile")
        assert "base64," in tiles_meta["tile_density"].value
        v1 = (extract_meta["sha256"].value, tiles_meta["data_version"].value)
        images_meta = _latest(instance, "tile_images", "t").metadata
        scenes_meta = _latest(instance, "naip_scenes", "t").metadata
        assert scenes_meta["source"].value == "synthetic" and scenes_meta["n_scenes"].value >= 1
        assert images_meta["n_tiles"].value == tiles_meta["n_tiles"].value == images_meta["n_with_image"].value
        assert images_meta["inputs"].value == {"tile_shards": v1[1], "naip_scenes": scenes_meta["data_version"].value}
        assert "base64," in images_meta["preview"].value and "base64," in scenes_meta["first_scene"].value
        images_v1 = (scenes_meta["data_version"].value, images_meta["data_version"].value)

        second = _materialize(instance, home, "t")
        assert second.success
        tiles_meta2 = _latest(instance, "tile_shards", "t").metadata
        assert _latest(instance, "osm_extract", "t").metadata["unchanged"].value is True
        assert (_latest(instance, "osm_extract", "t").metadata["sha256"].value, tiles_meta2["data_version"].value) == v1
        assert len(visible_datasets(home / "store")) == 1
        # data versions are recorded by Dagster too
        assert _latest(instance, "tile_shards", "t").tags["dagster/data_version"] == v1[1]
        assert _latest(instance, "osm_extract", "t").tags["dagster/data_version"] == v1[0]
        store = Store(home / "store")
        assert store.current_version("tiles", "t") == v1[1]
        # the synthetic scenes are deterministic, so the chips are too
        images_v2 = (_latest(instance, "naip_scenes", "t").metadata["data_version"].value,
                     _latest(instance, "tile_images", "t").metadata["data_version"].value)
        assert images_v2 == images_v1
        assert len(visible_datasets(home / "store", "scenes")) == 1 and len(visible_datasets(home / "store", "images")) == 1


def test_registry_sensor_keeps_partitions_in_sync(home):
    registry = RegionRegistry(home / "regions.yaml")
    registry.add(Region.create("a", "pyrosm:test"))
    registry.add(Region.create("b", "pyrosm:helsinki"))
    resource = GeojepaResource(home=str(home))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(regions_partitions.name, ["old"])
        ctx = dg.build_sensor_context(instance=instance, resources={"geojepa": resource})
        result = region_registry_sensor(ctx)
        kinds = {type(r).__name__: sorted(r.partition_keys) for r in result.dynamic_partitions_requests}
        assert kinds == {"AddDynamicPartitionsRequest": ["a", "b"], "DeleteDynamicPartitionsRequest": ["old"]}
        sync_region_partitions(instance, ["a", "b"])
        again = region_registry_sensor(dg.build_sensor_context(instance=instance, resources={"geojepa": resource}))
        assert not again.dynamic_partitions_requests and again.skip_reason
