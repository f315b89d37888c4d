import json

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from geojepa_pipeline.geo.osm_read import read_osm
from geojepa_pipeline.geo.shards import write_tile_shards
from geojepa_pipeline.store import TILES, Store
from geojepa_pipeline.geo.tiling import ENTITIES_SCHEMA, TILES_SCHEMA, tile_osm

from ..conftest import LIECHTENSTEIN, bench_module, needs_shared
from ..osm_fixtures import rules_fixture


def test_rules_fixture_tiles(tmp_path):
    tiled = tile_osm(read_osm(rules_fixture(tmp_path / "r.osm.pbf")), "r")
    assert tiled.epsg == 32632
    assert tiled.accounting()["balanced"]
    ents = tiled.entities.to_pandas()
    assert set(ents.osm_type) == {"node", "way", "relation"}
    # every piece lies inside its tile: tile-local coordinates within [0, 300]
    geoms = shapely.from_wkb(ents.geometry.to_numpy())
    b = shapely.bounds(geoms)
    assert (b[:, :2] >= -1e-6).all() and (b[:, 2:] <= 300 + 1e-6).all()
    boxes = np.stack(ents.minbox.to_numpy())
    assert boxes.shape[1] == 8 and (boxes >= 0).all() and (boxes <= 1).all()
    forest = ents[(ents.osm_type == "relation") & (ents.osm_id == 300)]
    assert len(forest) >= 2 and forest.is_clipped.all()  # 0.004 deg ~ 300 m: spans several tiles
    assert tiled.area_check["n_over_tolerance"] == 0 and tiled.area_check["n_polygons_checked"] >= 2
    # tags travel with every piece
    assert all(dict(t) == {"type": "multipolygon", "landuse": "forest"} for t in forest.tags)
    # the multipolygon has its hole: outer square minus inner square, from the member rings
    ring = lambda i: shapely.polygons(shapely.get_coordinates(shapely.line_merge(shapely.union_all(  # noqa: E731
        [shapely.transform(g, lambda c, o=o: c + o) for g, o in _pieces_utm(ents, tiled, "way", i)]))))
    assert forest.area_m2.sum() == pytest.approx(ring(100).area - ring(101).area, rel=1e-9)
    # the site relation collects its members' pieces: the building and the road
    site = ents[(ents.osm_type == "relation") & (ents.osm_id == 302)]
    road = ents[(ents.osm_type == "way") & (ents.osm_id == 103)]
    assert site.length_m.sum() == pytest.approx(road.length_m.sum() + ents[ents.osm_id == 102].length_m.sum())


def _pieces_utm(ents, tiled, osm_type, osm_id):
    """(piece geometry, tile origin) of one entity, for re-assembling it in UTM metres."""
    tiles = tiled.tiles.to_pandas().set_index("tile_id")
    rows = ents[(ents.osm_type == osm_type) & (ents.osm_id == osm_id)]
    return [(shapely.from_wkb(g), np.array([tiles.x_min_m[t], tiles.y_min_m[t]])) for g, t in zip(rows.geometry, rows.tile_id)]


@needs_shared
def test_liechtenstein_tiles_pinned():
    """The plain pyrosm+overlay count is 1,887 tiles (buildings, roads, POIs, landuse, natural).
    Restricted to features with those keys our grid has 2,026 non-empty tiles; every other tagged
    feature (power lines, waterways, barriers, ...) and untagged relation members bring it to
    2,875, and relation tokens (administrative areas, routes) to 3,146."""
    tiled = tile_osm(read_osm(LIECHTENSTEIN), "li")
    assert tiled.epsg == 32632
    assert tiled.tiles.num_rows == 3146
    assert tiled.entities.num_rows == 27707
    assert tiled.n_entities_kept == 8606 and tiled.accounting()["balanced"]
    assert tiled.area_check["n_polygons_checked"] == 4109
    assert tiled.area_check["max_rel_error"] < 1e-6
    ids = tiled.tiles.column("tile_id").to_pylist()
    assert len(set(ids)) == len(ids)
    x = np.asarray(tiled.tiles.column("x_min_m"))
    assert (np.mod(x, 300) == 0).all()
    # tiles-table counts agree with the entity pieces
    assert int(np.sum(tiled.tiles.column("n_entities"))) == tiled.entities.num_rows


def write_shards(tiled, root, **options):
    """write_tile_shards into a new tile_shards version of a store at ``root``; the committed Dataset."""
    with Store(root).writing(TILES, "t") as staging:
        staging.manifest = write_tile_shards(tiled, staging, **options)
    return staging.dataset


def test_shards_geoparquet_and_determinism(tmp_path, pyrosm_test_pbf):
    tiled = tile_osm(read_osm(pyrosm_test_pbf), "t")
    ds1 = write_shards(tiled, tmp_path / "a", shard_tiles=7)
    ds2 = write_shards(tile_osm(read_osm(pyrosm_test_pbf), "t"), tmp_path / "b", shard_tiles=7)
    assert len(ds1.shard_entries) == -(-tiled.tiles.num_rows // 7)
    for f in sorted(p.name for p in ds1.path.iterdir()):
        assert (ds1.path / f).read_bytes() == (ds2.path / f).read_bytes(), f"{f} differs between identical runs"
    assert ds1.data_version == ds2.data_version
    shard, tiles_path, entities_path = ds1.shard_entries[1], ds1.shards("tiles")[1], ds1.shards("entities")[1]
    assert pq.read_schema(tiles_path).remove_metadata().equals(TILES_SCHEMA)
    schema = pq.read_schema(entities_path)
    assert schema.remove_metadata().equals(ENTITIES_SCHEMA)
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    gdf = gpd.read_parquet(entities_path)
    assert gdf.geometry.name == "geometry" and gdf.crs is None and len(gdf) == shard["n_pieces"]
    tiles = pq.read_table(tiles_path)
    assert set(gdf.tile_id) == set(tiles.column("tile_id").to_pylist())
    assert sum(s["n_pieces"] for s in ds1.shard_entries) == tiled.entities.num_rows


def test_shard_size_must_be_positive(tmp_path, pyrosm_test_pbf):
    with pytest.raises(ValueError, match="shard_tiles"):
        write_shards(tile_osm(read_osm(pyrosm_test_pbf), "t"), tmp_path, shard_tiles=0)
    assert Store(tmp_path).current(TILES, "t") is None  # nothing half-written became a version


@pytest.fixture(scope="module")
def wide_pbf(tmp_path_factory, pyrosm_test_pbf):
    """pyrosm's test extract copied 4 x 1: wide enough for several 16-tile block columns."""
    return bench_module("replicate").replicate(pyrosm_test_pbf, tmp_path_factory.mktemp("wide") / "wide.osm.pbf", 4, 1)


def test_bands_workers_and_spill_agree(tmp_path, wide_pbf):
    """Banding bounds memory and feeds the worker pool; it must not change what is produced."""
    data = read_osm(wide_pbf)
    whole = tile_osm(data, "h")
    serial = tile_osm(data, "h", band_entities=2500, workers=1)
    pooled = tile_osm(data, "h", band_entities=2500, workers=2, spill_dir=tmp_path)
    assert serial.n_bands >= 2 and pooled.n_bands == serial.n_bands
    spilled = pa.concat_tables([e for _, e in pooled.entity_chunks()])
    assert pooled.entities is None and len(list(tmp_path.glob("band-*.arrow"))) == pooled.n_bands
    assert spilled.equals(serial.entities)  # worker count and spilling change nothing
    assert serial.tiles.equals(whole.tiles)
    assert serial.accounting() == whole.accounting() and serial.area_check["n_over_tolerance"] == 0
    key = lambda t: sorted(zip(t.column("tile_id").to_pylist(), t.column("osm_type").to_pylist(), t.column("osm_id").to_pylist()))  # noqa: E731
    assert key(serial.entities) == key(whole.entities)
    # geometry agrees up to floating-point rounding of the clipping order
    np.testing.assert_allclose(np.asarray(serial.entities.column("area_m2")), np.asarray(whole.entities.column("area_m2")), atol=1e-6)


def test_shards_stream_across_band_boundaries(tmp_path, wide_pbf):
    tiled = tile_osm(read_osm(wide_pbf), "h", band_entities=2500, workers=1, spill_dir=tmp_path / "spill")
    assert tiled.n_bands >= 2
    ds = write_shards(tiled, tmp_path / "out", shard_tiles=4)
    assert [s["n_tiles"] for s in ds.shard_entries] == [4] * (tiled.tiles.num_rows // 4) + ([tiled.tiles.num_rows % 4] if tiled.tiles.num_rows % 4 else [])
    tiles = pa.concat_tables([pq.read_table(p) for p in ds.shards("tiles")])
    ents = pa.concat_tables([pq.read_table(p) for p in ds.shards("entities")])
    assert tiles.column("tile_id").to_pylist() == tiled.tiles.column("tile_id").to_pylist()
    assert ents.num_rows == tiled.n_pieces == ds.manifest["n_pieces"]
    for tiles_path, entities_path in zip(ds.shards("tiles"), ds.shards("entities")):  # every shard holds exactly its tiles' pieces
        t = pq.read_table(tiles_path)
        e = pq.read_table(entities_path)
        assert set(e.column("tile_id").to_pylist()) == set(t.column("tile_id").to_pylist())
        assert e.num_rows == sum(t.column("n_entities").to_pylist())


def test_shard_statistics_only_on_flat_columns(tmp_path):
    tiled = tile_osm(read_osm(rules_fixture(tmp_path / "r.osm.pbf")), "r")
    ds = write_shards(tiled, tmp_path / "out")
    meta = pq.ParquetFile(ds.shards("entities")[0]).metadata.row_group(0)
    stats = {meta.column(i).path_in_schema: meta.column(i).is_stats_set for i in range(meta.num_columns)}
    assert stats["tile_id"] and stats["osm_id"]  # min/max prune reads by tile and entity
    assert not stats["geometry"] and not stats["tags.key_value.key"] and not stats["minbox.list.element"]
