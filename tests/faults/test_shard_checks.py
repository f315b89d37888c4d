"""Faults: data that says it is repaired is, and the tile_shards checks protect what is current (issue 19, items 5 and 7).

Before: 21 of pyrosm test's 3,501 pieces failed GEOS validity (ways with one located vertex, written as a line
of one repeated point, and a relation collecting one); a node at latitude 95 crashed the tiler with numpy's
"array is too big"; the checks were not blocking and a failed one still moved CURRENT.
"""

import numpy as np
import shapely

from geojepa_pipeline.geo import tiling
from geojepa_pipeline.geo.osm_read import read_osm
from geojepa_pipeline.geo.shards import invalid_pieces
from geojepa_pipeline.geo.tiling import tile_osm

from ..conftest import visible_datasets
from ..osm_fixtures import write_pbf
from ..test_cli import one_line_error, run


def _store(home):
    from geojepa_pipeline.store import Store

    return Store(home / "store")


def test_a_way_with_one_located_vertex_becomes_a_point_and_every_piece_is_valid(tmp_path, pyrosm_test_pbf):
    lon, lat = 9.52, 47.14
    pbf = write_pbf(tmp_path / "partial.osm.pbf",
                    nodes=[(1, lon, lat, {}), (2, lon + 0.001, lat, {}), (3, lon, lat + 0.001, {"amenity": "bench"})],
                    ways=[(10, [1, 99, 98], {"highway": "path"}),  # nodes 99 and 98 are outside the extract
                          (11, [1, 2], {"highway": "track"})])
    tiled = tile_osm(read_osm(pbf), "p", workers=1)
    ents = tiled.entities
    rows = {(t, i): g for t, i, g in zip(ents["osm_type"].to_pylist(), ents["osm_id"].to_pylist(), ents["geom_type"].to_pylist())}
    assert rows[("way", 10)] == "Point" and rows[("way", 11)] == "LineString"
    assert tiled.accounting()["repaired"] == {"partial_way_missing_nodes": 1, "zero_length_line_as_point": 1}
    geoms = shapely.from_wkb(ents["geometry"].to_numpy(zero_copy_only=False))
    assert shapely.is_valid(geoms).all()

    real = tile_osm(read_osm(pyrosm_test_pbf), "t", workers=1)
    real_geoms = shapely.from_wkb(real.entities["geometry"].to_numpy(zero_copy_only=False))
    assert len(real_geoms) == 3501 and shapely.is_valid(real_geoms).all()
    assert real.accounting()["repaired"]["zero_length_line_as_point"] == 20 and real.accounting()["balanced"]


def test_a_node_off_the_globe_is_dropped_and_counted_not_a_crash(tmp_path, home, capsys):
    lon, lat = 9.52, 47.14
    pbf = write_pbf(tmp_path / "off_globe.osm.pbf",
                    nodes=[(1, lon, lat, {"amenity": "bench"}), (2, lon, 95.0, {"amenity": "bench"}),
                           (3, lon + 0.001, lat, {}), (4, lon + 0.002, lat, {}), (5, 200.0, lat, {})],
                    ways=[(10, [3, 4, 2], {"highway": "path"}), (11, [5, 2], {"highway": "path"})])
    data = read_osm(pbf)
    assert data.dropped["location_off_the_globe"] == 1  # the tagged node at latitude 95
    assert data.dropped["missing_node_locations"] == 1  # way 11: neither of its nodes is on the globe
    assert data.repaired["partial_way_missing_nodes"] == 1  # way 10 keeps its two located vertices
    assert run(capsys, "regions", "add", "g", "--osm", str(pbf), "--imagery", "none")[0] == 0
    code, out, err = run(capsys, "materialize", "--region", "g", "--select", "key:osm_extract or key:tile_shards")
    assert code == 0, err
    ds = _store(home).current("tiles", "g")
    assert ds.manifest["accounting"]["dropped"]["location_off_the_globe"] == 1 and ds.manifest["accounting"]["balanced"]
    assert invalid_pieces(ds.shards("entities"))["n_invalid"] == 0


def _invalid_first_line(describe):
    """``tiling._describe`` with the first line piece replaced by a line of one repeated point (the old defect)."""
    def corrupt(geom, tx, ty, length, s):
        lines = np.flatnonzero(shapely.get_type_id(geom) == 1)
        geom = geom.copy()
        x, y = shapely.get_coordinates(geom[lines[0]])[0]
        geom[lines[0]] = shapely.linestrings([[x, y], [x, y]])
        return describe(geom, tx, ty, length, s)
    return corrupt


def test_an_invalid_piece_fails_the_blocking_check_and_the_last_good_version_stays_current(home, capsys, monkeypatch):
    from geojepa_pipeline.store import TILES

    select = "key:osm_extract or key:tile_shards or key:naip_scenes or key:tile_images"
    assert run(capsys, "regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "synthetic")[0] == 0
    assert run(capsys, "materialize", "--region", "t", "--select", select)[0] == 0
    store = _store(home)
    good = store.current_version(TILES, "t")
    images_before = store.current_version("images", "t")

    describe = tiling._describe
    monkeypatch.setattr(tiling, "_describe", _invalid_first_line(describe))
    code, out, err = run(capsys, "materialize", "--region", "t", "--select", select)
    assert code == 2
    line = one_line_error(err)
    assert "valid_geometry" in line and "tile_shards" in line, line
    assert f"CURRENT stays at {good}" in out + err  # the console's warning
    assert store.current_version(TILES, "t") == good
    versions = [p.name for p in visible_datasets(home / "store")]
    assert len(versions) == 2 and good in versions  # the failed version is kept, readable by its version
    bad = next(v for v in versions if v != good)
    found = invalid_pieces(store.dataset(TILES, "t", bad).shards("entities"))
    assert found["n_invalid"] == 1 and found["by_reason"] == {"Too few points in geometry component": 1}
    assert store.current_version("images", "t") == images_before  # tile_images did not run on the bad shards

    monkeypatch.setattr(tiling, "_describe", describe)
    assert run(capsys, "materialize", "--region", "t", "--select", select)[0] == 0
    assert store.current_version(TILES, "t") == good
