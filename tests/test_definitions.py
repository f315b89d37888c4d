import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from geojepa_pipeline.definitions import defs

from .conftest import REPO


def test_definitions_list_the_expected_assets_and_checks():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {"osm_extract", "tile_shards", "naip_scenes", "tile_images", "tag_embeddings",
                                                                         "geometry_encoder", "tile_tokens", "geojepa_checkpoint",
                                                                         "evaluation_report", "tile_embeddings"}
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {("tile_shards", "schema"), ("tile_shards", "entity_accounting"), ("tile_shards", "clipped_area"),
                      ("tile_shards", "valid_geometry"), ("tile_images", "aligned_with_tiles"), ("tile_tokens", "aligned_with_entities")}
    upstream = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert upstream["tile_images"] == {"tile_shards", "naip_scenes"} and upstream["naip_scenes"] == {"tile_shards"}
    assert upstream["tag_embeddings"] == upstream["geometry_encoder"] == {"tile_shards"}
    assert upstream["tile_tokens"] == {"tile_shards", "tag_embeddings", "geometry_encoder", "tile_images"}
    assert upstream["geojepa_checkpoint"] == {"tile_tokens", "tile_images", "tag_embeddings", "geometry_encoder"}
    assert upstream["evaluation_report"] == {"geojepa_checkpoint"}
    assert upstream["tile_embeddings"] == {"tile_tokens", "geojepa_checkpoint"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if key.to_user_string() in ("tag_embeddings", "geometry_encoder"):  # over all regions
            assert node.partitions_def is None
        elif key.to_user_string() in ("geojepa_checkpoint", "evaluation_report"):
            assert node.partitions_def.get_partition_keys() == ["T", "GT", "TI", "GTI"]
        elif key.to_user_string() == "tile_embeddings":  # region x variant; each upstream maps on its own dimension
            dims = {d.name: d.partitions_def for d in node.partitions_def.partitions_defs}
            assert dims["region"].name == "regions" and dims["variant"].get_partition_keys() == ["T", "GT", "TI", "GTI"]
            for parent in ("tile_tokens", "geojepa_checkpoint"):  # inferred from the shared dimension definitions
                assert type(graph.get_partition_mapping(key, dg.AssetKey(parent))).__name__ == "MultiToSingleDimensionPartitionMapping"
        else:
            assert node.partitions_def.name == "regions"
        assert node.code_version
    assert defs.resolve_sensor_def("region_registry_sensor")


def test_workspace_yaml_loads_with_dagster_cli(tmp_path):
    """What `dagster dev -w workspace.yaml` loads, validated by Dagster's own CLI."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "GEOJEPA_HOME": str(tmp_path / "home")}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run([str(dagster), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "geojepa_pipeline" in proc.stdout + proc.stderr


def test_tile_shards_checks_block_everything_downstream():
    """A failed schema, accounting, clipped-area or validity check stops the run before tokens, chips or training read the shards."""
    from geojepa_pipeline.assets.osm import tile_shards

    specs = {spec.name: spec for spec in tile_shards.check_specs}
    assert set(specs) == {"schema", "entity_accounting", "clipped_area", "valid_geometry"}
    assert all(spec.blocking for spec in specs.values())
