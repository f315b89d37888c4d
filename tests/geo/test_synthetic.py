"""The synthetic NAIP-like renderer: classes from tags, spectral signatures, determinism, real COGs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import rasterio
import shapely

from geojepa_pipeline.geo.synthetic import (
    CLASS, NO_CLASS, SyntheticBlock, classify, render_block, write_cog,
)


def tags(*dicts):
    return pa.array([list(d.items()) for d in dicts], pa.map_(pa.string(), pa.string()))


def test_classify_picks_the_painted_class_and_widths():
    cls, width = classify(
        tags({"building": "yes", "landuse": "residential"}, {"highway": "primary", "name": "X"},
             {"highway": "footway"}, {"natural": "water"}, {"amenity": "bench"}, {"waterway": "river"}, {}),
        np.arange(7),
    )
    assert CLASS["roof_red"] <= cls[0] <= CLASS["roof_dark"]  # a roof tone, by osm id
    assert cls[1] == CLASS["road"] and width[1] == 10
    assert cls[2] == CLASS["path"] and width[2] == 2
    assert cls[3] == CLASS["water"]
    assert cls[4] == NO_CLASS and cls[6] == NO_CLASS
    assert cls[5] == CLASS["water"] and width[5] == 12


def scene_geoms():
    """In a 120 m block: a lake (west), a forest (east), a primary road (middle), a building."""
    geoms = np.array([
        shapely.box(5, 5, 55, 115), shapely.box(65, 5, 115, 115),
        shapely.LineString([(0, 60), (120, 60)]), shapely.box(80, 80, 100, 100),
    ], dtype=object)
    t = tags({"natural": "water"}, {"landuse": "forest"}, {"highway": "primary"}, {"building": "yes"})
    cls, width = classify(t, np.arange(4))
    return geoms, cls, width


def test_spectral_signatures_of_rendered_classes():
    geoms, cls, width = scene_geoms()
    block = SyntheticBlock(0, 0, 0.0, 0.0, 120.0)
    img = render_block(block, geoms, cls, width, seed=7, res_m=0.6).astype(float)  # (4, 200, 200), row 0 north
    assert img.shape == (4, 200, 200)

    def px(x, y):  # mean R, G, B, NIR in a 6 m box around (x, y) metres
        r, c = int((120 - y) / 0.6), int(x / 0.6)
        return img[:, r - 5:r + 5, c - 5:c + 5].mean(axis=(1, 2))

    water, forest, road, roof = px(30, 30), px(90, 30), px(30, 60), px(90, 90)
    ndvi = lambda v: (v[3] - v[0]) / (v[3] + v[0])  # noqa: E731
    assert water[3] < 25 and ndvi(water) < -0.3  # very low NIR
    assert ndvi(forest) > 0.3  # vegetation: high NIR
    assert abs(road[0] - road[1]) < 8 and 60 < road[0] < 110  # asphalt grey
    assert ndvi(roof) < 0.2
    # the road is ~10 m wide: about 17 px of the column across it are road-grey
    column = img[0, :, 50]
    assert 12 <= int(np.sum(np.abs(column - 84) < 14)) <= 22


def test_render_is_deterministic_for_a_seed_and_writes_a_cog(tmp_path):
    geoms, cls, width = scene_geoms()
    block = SyntheticBlock(3, 4, 0.0, 0.0, 120.0)
    a = render_block(block, geoms, cls, width, seed=1)
    assert np.array_equal(a, render_block(block, geoms, cls, width, seed=1))
    assert not np.array_equal(a, render_block(block, geoms, cls, width, seed=2))
    path = tmp_path / "s.tif"
    big = np.repeat(np.repeat(a, 8, axis=1), 8, axis=2)  # 1600 px: large enough for overviews
    write_cog(path, big, 32632, 500_000.0, 5_100_000.0, 0.075, "2020-06-01")
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.crs.to_epsg() == 32632 and src.count == 4 and src.dtypes[0] == "uint8"
        assert src.overviews(1) and src.block_shapes[0] == (512, 512)
        assert src.tags()["TIFFTAG_DATETIME"].startswith("2020:06:01")
        assert np.array_equal(src.read(), big)
