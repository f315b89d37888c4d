"""Block-by-block ingestion gives what a whole-file run gives (issue 20, item 2)."""

import pyarrow as pa
import pytest

from geojepa_pipeline.geo.blocks import BlockPlan, ingest_blocks, spill_pbf
from geojepa_pipeline.geo.clip import ClipArea, clip_osm
from geojepa_pipeline.geo.osm_read import read_osm
from geojepa_pipeline.geo.tiling import tile_osm
from geojepa_pipeline.stages.osm import build_tile_shards
from geojepa_pipeline.store import Store

from ..conftest import LIECHTENSTEIN, needs_shared
from ..osm_fixtures import write_pbf


def _pieces(tiled) -> pa.Table:
    return pa.concat_tables([e for _, e in tiled.entity_chunks()])


def _assert_same(merged, members, whole, whole_members):
    assert merged.epsg == whole.epsg
    assert merged.tiles.equals(whole.tiles)
    assert _pieces(merged).equals(_pieces(whole))  # every column, geometry bytes included
    assert merged.accounting() == whole.accounting() and merged.accounting()["balanced"]
    assert merged.area_check == whole.area_check
    assert members.equals(whole_members)


@needs_shared
def test_liechtenstein_in_five_blocks_is_the_whole_file_run(tmp_path):
    """Five blocks tiled two at a time, in spawned processes (``workers=2``), merged into the whole-file run."""
    data = read_osm(LIECHTENSTEIN)
    whole = tile_osm(data, "li", workers=1)
    merged, members = ingest_blocks(LIECHTENSTEIN, "li", tmp_path, block_tiles=80, workers=2)
    assert len(merged.shares) == 5
    _assert_same(merged, members, whole, data.relation_members())


def test_entities_in_no_block_are_accounted_as_a_whole_file_run_does(tmp_path):
    """A tagged node off the globe, a way and a relation with no located node, across two blocks of 16 tiles."""
    lon, lat = 9.52, 47.14
    pbf = write_pbf(tmp_path / "odd.osm.pbf", nodes=[
        (1, lon, lat, {"amenity": "bench"}), (2, lon + 0.08, lat, {}), (3, lon, lat + 0.08, {}),
        (4, lon, 95.0, {"amenity": "bench"}), (5, lon + 0.001, lat, {"created_by": "x"})],
        ways=[(10, [1, 2], {"highway": "path"}), (11, [98, 99], {"highway": "path"}), (12, [2, 3], {}),
              (13, [3, 1], {"waterway": "ditch"})],
        relations=[(20, [("w", 11, ""), ("n", 97, "")], {"type": "route"}), (21, [("w", 12, ""), ("w", 13, "")], {"type": "route"}),
                   (22, [("r", 21, ""), ("n", 4, "")], {"type": "super"})])
    data = read_osm(pbf)
    whole = tile_osm(data, "o", workers=1)
    merged, members = ingest_blocks(pbf, "o", tmp_path / "b", block_tiles=16, workers=1)
    assert len(merged.shares) >= 2
    _assert_same(merged, members, whole, data.relation_members())
    assert merged.dropped["location_off_the_globe"] == 1 and merged.dropped["relation_without_members_in_extract"] == 1


def test_a_clipped_region_by_blocks_is_the_clipped_whole_file_run(tmp_path, pyrosm_test_pbf):
    clip = ClipArea.parse("26.942,60.526,26.958,60.535")
    data = read_osm(pyrosm_test_pbf)
    whole = tile_osm(clip_osm(data, clip), "c", workers=1, clip=clip)
    merged, _ = ingest_blocks(pyrosm_test_pbf, "c", tmp_path, block_tiles=16, workers=1, clip=clip)
    assert merged.tiles.equals(whole.tiles) and _pieces(merged).equals(_pieces(whole))
    assert merged.area_check == whole.area_check
    acc, whole_acc = merged.accounting(), whole.accounting()
    assert acc["balanced"] and acc["n_input"] == whole_acc["n_input"] and acc["n_entities_kept"] == whole_acc["n_entities_kept"]
    assert acc["dropped"] == whole_acc["dropped"]


def test_one_block_and_two_blocks_give_the_data_version_of_a_whole_file_run(tmp_path, pyrosm_test_pbf):
    whole = build_tile_shards("t", Store(tmp_path / "whole"), extract_path=pyrosm_test_pbf, source={}, block_min_mb=-1)
    one = build_tile_shards("t", Store(tmp_path / "one"), extract_path=pyrosm_test_pbf, source={}, block_min_mb=0, block_tiles=1024)
    two = build_tile_shards("t", Store(tmp_path / "two"), extract_path=pyrosm_test_pbf, source={}, block_min_mb=0, block_tiles=16,
                            workers=1)
    assert "ingestion" not in whole.manifest and one.manifest["ingestion"]["n_blocks"] == 1 and two.manifest["ingestion"]["n_blocks"] == 2
    assert one.dataset.data_version == two.dataset.data_version == whole.dataset.data_version
    assert one.manifest["accounting"] == two.manifest["accounting"] == whole.manifest["accounting"]
    assert not two.failed_checks and two.current == two.dataset.data_version


def test_blocks_must_nest_the_sort_blocks(tmp_path, pyrosm_test_pbf):
    spill = spill_pbf(pyrosm_test_pbf, tmp_path)
    with pytest.raises(ValueError, match="multiple of 16"):
        BlockPlan(spill, 40)


def test_blocks_each_in_their_own_process_with_band_workers_give_the_whole_file_version(tmp_path, pyrosm_test_pbf):
    """What ``geojepa materialize`` runs: a unit at a time, each block in a fresh fork that forks its band workers."""
    from geojepa_pipeline.stages.osm import commit_tile_shards, plan_tile_shards, tile_unit

    whole = build_tile_shards("t", Store(tmp_path / "whole"), extract_path=pyrosm_test_pbf, source={}, block_min_mb=-1)
    store = Store(tmp_path / "forked")
    plan = plan_tile_shards("t", store, pyrosm_test_pbf, {}, block_min_mb=0, block_tiles=16)
    results = [tile_unit(plan, unit, workers=2, own_process=True) for unit in plan.units]
    assert all(r.tiled is None or r.tiled.n_bands >= 1 for r in results)
    committed = commit_tile_shards(plan, store, results)
    assert committed.dataset.data_version == whole.dataset.data_version and not committed.failed_checks
