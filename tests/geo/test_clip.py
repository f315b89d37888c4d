"""--clip: a clipped region is exactly the touching tiles of a whole-extract run (issue 20, item 1)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.clip import ClipArea, clip_osm, tiles_touching
from geojepa_pipeline.geo.osm_read import read_osm
from geojepa_pipeline.geo.tiling import tile_osm

from ..conftest import LIECHTENSTEIN, needs_shared
from ..osm_fixtures import write_pbf


def _whole_and_clipped(pbf, clip: ClipArea):
    data = read_osm(pbf)
    whole = tile_osm(data, "r", workers=1)
    clipped = tile_osm(clip_osm(data, clip), "r", workers=1, clip=clip)
    return data, whole, clipped


def _assert_clipped_is_the_touching_part_of_whole(whole, clipped, clip: ClipArea):
    assert clipped.epsg == whole.epsg == clip.epsg
    tiles = whole.tiles
    touching = tiles_touching(clip.projected(whole.epsg), tiles["tile_x"].to_numpy(), tiles["tile_y"].to_numpy(), 300.0)
    assert 0 < touching.sum() < len(touching)
    assert clipped.tiles.equals(tiles.filter(pa.array(touching)))
    kept = pc.is_in(whole.entities["tile_id"], tiles["tile_id"].filter(pa.array(touching)))
    assert clipped.entities.equals(whole.entities.filter(kept))  # every column: geometry bytes, is_clipped, completeness
    acc = clipped.accounting()
    assert acc["balanced"] and acc["n_input"] == whole.accounting()["n_input"] and acc["dropped"]["outside_clip"] > 0
    assert clipped.area_check["n_over_tolerance"] == 0 and clipped.area_check["n_polygons_checked"] > 0


def test_a_clipped_run_is_exactly_the_touching_tiles_of_a_whole_run(pyrosm_test_pbf):
    clip = ClipArea.parse("26.942,60.526,26.958,60.535")
    _, whole, clipped = _whole_and_clipped(pyrosm_test_pbf, clip)
    _assert_clipped_is_the_touching_part_of_whole(whole, clipped, clip)


@needs_shared
def test_clipping_liechtenstein_with_a_geojson_polygon(tmp_path):
    path = tmp_path / "vaduz.geojson"
    triangle = [[9.50, 47.10], [9.57, 47.12], [9.52, 47.18], [9.50, 47.10]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [triangle]}}]}))
    clip = ClipArea.parse(str(path))
    _, whole, clipped = _whole_and_clipped(LIECHTENSTEIN, clip)
    _assert_clipped_is_the_touching_part_of_whole(whole, clipped, clip)
    assert clipped.tiles.num_rows < 0.3 * whole.tiles.num_rows


def test_a_multipolygon_ringed_by_ways_far_outside_still_covers_the_area(tmp_path):
    """The area lies inside a forest multipolygon whose four outer ways each stay outside the area's box."""
    lon, lat, d = 9.50, 47.10, 0.05
    corners = [(1, lon - d, lat - d), (2, lon + d, lat - d), (3, lon + d, lat + d), (4, lon - d, lat + d)]
    pbf = write_pbf(tmp_path / "ring.osm.pbf",
                    nodes=[(i, x, y, {}) for i, x, y in corners] + [(9, lon + 0.001, lat + 0.001, {"amenity": "bench"})],
                    ways=[(11, [1, 2], {}), (12, [2, 3], {}), (13, [3, 4], {}), (14, [4, 1], {})],
                    relations=[(20, [("w", 11, "outer"), ("w", 12, "outer"), ("w", 13, "outer"), ("w", 14, "outer")],
                                {"type": "multipolygon", "landuse": "forest"})])
    clip = ClipArea.parse(f"{lon - 0.002},{lat - 0.002},{lon + 0.004},{lat + 0.004}")
    data, whole, clipped = _whole_and_clipped(pbf, clip)
    _assert_clipped_is_the_touching_part_of_whole(whole, clipped, clip)
    rows = set(zip(clipped.entities["osm_type"].to_pylist(), clipped.entities["osm_id"].to_pylist()))
    assert ("relation", 20) in rows and ("node", 9) in rows
    forest = clipped.entities.filter(pc.equal(clipped.entities["osm_id"], 20))
    assert np.allclose(forest["area_m2"].to_numpy(), 300.0 * 300.0)  # a whole tile inside the forest


@pytest.mark.parametrize("text, message", [
    ("1,2,3", "give W,S,E,N in degrees"),
    ("10,5,9,6", "need -180 <= W < E <= 180"),
    ("9.5,47.1,9.6,95", "need -180 <= W < E <= 180 and -90 <= S < N <= 90"),
    ("/nowhere/area.geojson", "no such file"),
])
def test_a_bad_clip_is_one_line_that_says_what_to_give(text, message):
    with pytest.raises(GeojepaError) as err:
        ClipArea.parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_geojson_without_a_polygon_is_refused(tmp_path):
    path = tmp_path / "point.geojson"
    path.write_text(json.dumps({"type": "Point", "coordinates": [9.5, 47.1]}))
    with pytest.raises(GeojepaError, match="holds no polygon with an area"):
        ClipArea.parse(str(path))
