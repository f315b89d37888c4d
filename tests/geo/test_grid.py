import numpy as np
import pytest
import shapely

from geojepa_pipeline.geo.grid import choose_epsg, clip_to_grid, parse_tile_id, tile_ids, utm_epsg
from geojepa_pipeline.geo.minbox import minbox_corners


def test_utm_zone_choice():
    assert utm_epsg(9.5, 47.1) == 32632  # Liechtenstein
    assert utm_epsg(24.94, 60.17) == 32635  # Helsinki
    assert utm_epsg(-74.0, 40.7) == 32618  # New York
    assert utm_epsg(151.2, -33.9) == 32756  # Sydney (south)
    assert utm_epsg(180.0, 0.0) == 32601
    assert choose_epsg(np.array([shapely.Point(9.4, 47.0), shapely.Point(9.6, 47.3)])) == 32632


def test_tile_ids_roundtrip():
    ids = tile_ids(32632, np.array([1590, -3]), np.array([17510, 7]))
    assert ids == ["32632_1590_17510", "32632_-3_7"]
    assert parse_tile_id(ids[0]) == (32632, 1590, 17510)


def test_points_lie_in_exactly_one_half_open_cell():
    pts = shapely.points([[0, 0], [299.999, 10], [300, 10], [600, 600], [-0.001, 5]])
    owner, tx, ty, pieces, clipped = clip_to_grid(pts)
    got = {int(o): (int(x), int(y)) for o, x, y in zip(owner, tx, ty)}
    assert got == {0: (0, 0), 1: (0, 0), 2: (1, 0), 3: (2, 2), 4: (-1, 0)}
    assert not clipped.any()


def test_polygon_over_four_tiles_keeps_its_area():
    poly = shapely.Polygon([(100, 100), (500, 120), (520, 480), (90, 470)])
    owner, tx, ty, pieces, clipped = clip_to_grid(np.array([poly]))
    assert sorted(zip(tx.tolist(), ty.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert clipped.all()
    assert abs(shapely.area(pieces).sum() - poly.area) / poly.area < 1e-12
    for x, y, p in zip(tx, ty, pieces):
        assert shapely.box(x * 300, y * 300, x * 300 + 300, y * 300 + 300).buffer(1e-9).contains(p)


def test_long_line_is_cut_into_pieces_that_sum_to_its_length():
    # a diagonal over ~60 x 40 cells exercises the halving path
    line = shapely.LineString([(10, 10), (9000, 6000), (18000, 12005)])
    owner, tx, ty, pieces, _ = clip_to_grid(np.array([line]))
    assert abs(shapely.length(pieces).sum() - line.length) < 1e-6
    assert len(set(zip(tx.tolist(), ty.tolist()))) == len(tx)  # one piece per tile
    assert all(p.geom_type in ("LineString", "MultiLineString") for p in pieces)


def test_edge_contact_is_not_a_piece():
    square = shapely.box(0, 0, 300, 300)  # touches cells (1, *) and (*, 1) only on its boundary
    owner, tx, ty, pieces, _ = clip_to_grid(np.array([square]))
    assert list(zip(tx.tolist(), ty.tolist())) == [(0, 0)]
    assert pieces[0].equals(square)


def test_collection_parts_are_clipped_separately_and_regrouped():
    gc = shapely.GeometryCollection([shapely.Point(50, 50), shapely.LineString([(10, 20), (590, 20)]), shapely.box(250, 100, 350, 200)])
    owner, tx, ty, pieces, _ = clip_to_grid(np.array([gc]))
    tiles = dict(zip(zip(tx.tolist(), ty.tolist()), pieces))
    assert set(tiles) == {(0, 0), (1, 0)}
    left = tiles[(0, 0)]
    assert left.geom_type == "GeometryCollection"
    kinds = sorted(g.geom_type for g in shapely.get_parts(left))
    assert kinds == ["LineString", "Point", "Polygon"]  # GEOS overlay would have merged these
    assert abs(sum(g.area for g in tiles.values()) - 100 * 100) < 1e-9


def test_minbox_corners():
    rect = shapely.Polygon([(30, 30), (90, 30), (90, 60), (30, 60)])
    c = minbox_corners(np.array([rect, shapely.Point(150, 150), shapely.LineString([(0, 0), (300, 300)])]),
                       np.zeros(3), np.zeros(3))
    assert c.shape == (3, 8) and c.dtype == np.float32
    np.testing.assert_allclose(c[0], [0.1, 0.1, 0.3, 0.1, 0.3, 0.2, 0.1, 0.2], atol=1e-6)  # CCW from lower-left
    np.testing.assert_allclose(c[1], [0.5] * 8)
    np.testing.assert_allclose(c[2], [0, 0, 1, 1, 1, 1, 0, 0], atol=1e-6)
    rotated = shapely.affinity.rotate(shapely.box(100, 100, 200, 140), 30)
    c = minbox_corners(np.array([rotated]), np.zeros(1), np.zeros(1))[0].reshape(4, 2) * 300
    assert shapely.Polygon(c).area == pytest.approx(rotated.area, rel=1e-5)
    assert c[0, 1] == pytest.approx(c[:, 1].min())


def test_unique_ints_and_isin_sorted_match_numpy():
    from geojepa_pipeline.geo.grid import isin_sorted, unique_ints

    rng = np.random.default_rng(0)
    a = rng.integers(-10**10, 10**10, 5000)
    a[:100] = a[100:200]  # duplicates
    u = unique_ints(a)
    np.testing.assert_array_equal(u, np.unique(a))
    q = np.concatenate([a[:50], rng.integers(-10**10, 10**10, 50)])
    np.testing.assert_array_equal(isin_sorted(q, u), np.isin(q, a))
    assert unique_ints(np.zeros(0, np.int64)).size == 0 and not isin_sorted(q, u[:0]).any()
