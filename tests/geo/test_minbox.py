import numpy as np
import pytest
import shapely

from geojepa_pipeline.geo.minbox import min_rect_corners_m, minbox_corners, minbox_from_coords

# A route relation's piece from Liechtenstein (2013): its 4 member ways, listed 4 times. GEOS
# oriented_envelope / minimum_rotated_rectangle return a 1.6 m^2 rectangle that misses most of it.
ROUTE_PIECE_WKT = "MULTILINESTRING (" + ", ".join(4 * [
    "(242.3 111.3, 251.4 40.7, 252.6 31.4, 254.4 16.1, 257.5 0)", "(214.5 269.3, 219.6 237.3, 234.2 159.7)",
    "(234.2 159.7, 237.2 143.1, 242.3 111.3)", "(209.9 300, 210.8 292.7, 212.7 281.4, 214.5 269.3)"]) + ")"


def _quad_area(c: np.ndarray) -> np.ndarray:
    """(M, 8) corners -> (M,) shoelace areas (positive when counter-clockwise)."""
    q = c.reshape(-1, 4, 2).astype(np.float64)
    x, y = q[..., 0], q[..., 1]
    return 0.5 * np.sum(x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y, axis=1)


def _random_shapes(n: int, seed: int = 0) -> np.ndarray:
    """Points, multipoints, lines and polygons (convex and not) of 1..200 vertices near (150, 150)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = int(rng.integers(1, 200 if k % 10 == 0 else 12))
        pts = rng.normal(size=(m, 2)) * rng.uniform(1, 40) + 150
        if m == 1:
            out.append(shapely.Point(pts[0]))
        elif k % 3 == 0:
            out.append(shapely.MultiPoint(pts))
        elif k % 3 == 1:
            out.append(shapely.LineString(pts))
        else:
            poly = shapely.concave_hull(shapely.MultiPoint(pts), ratio=0.3) if m >= 3 else shapely.LineString(pts)
            out.append(poly)
    return np.array(out, dtype=object)


def test_areas_match_geos_oriented_envelope():
    shapes = _random_shapes(1500)
    origin = np.full(len(shapes), -1000.0)
    c = minbox_corners(shapes, origin, origin, tile_size_m=3000.0)  # a big tile: nothing is clamped
    ours = _quad_area(c) * 3000.0 ** 2
    envelope = shapely.oriented_envelope(shapes)
    geos = shapely.area(envelope)
    # corners are float32 tile units: each is off by up to 3000 m * 2**-24, so the area by ~perimeter x that
    tolerance = 2 * shapely.length(envelope) * 3000.0 * 2.0**-24 + 1e-9
    assert np.all(np.abs(ours - geos) <= tolerance)
    assert (ours >= -1e-9).all()  # counter-clockwise (or degenerate)


def test_corner_order_starts_lowest_then_leftmost():
    shapes = _random_shapes(300, seed=1)
    origin = np.full(len(shapes), -1000.0)
    q = minbox_corners(shapes, origin, origin, tile_size_m=3000.0).reshape(-1, 4, 2)
    y = q[..., 1]
    assert np.all(y[:, 0] <= y.min(axis=1) + 1e-6)


@pytest.mark.parametrize(
    "points, expected",
    [
        ([(30.0, 60.0)], [0.1, 0.2] * 4),  # a point: four equal corners
        ([(30.0, 60.0)] * 5, [0.1, 0.2] * 4),  # coinciding vertices
        ([(0.0, 0.0), (150.0, 150.0), (300.0, 300.0)], [0, 0, 1, 1, 1, 1, 0, 0]),  # collinear: (a, b, b, a)
        ([(300.0, 0.0), (0.0, 0.0)], [0, 0, 1, 0, 1, 0, 0, 0]),
        ([(30.0, 30.0), (90.0, 30.0), (90.0, 60.0), (30.0, 60.0), (60.0, 45.0)], [0.1, 0.1, 0.3, 0.1, 0.3, 0.2, 0.1, 0.2]),
    ],
)
def test_degenerate_and_exact_cases(points, expected):
    xy = np.asarray(points, np.float64)
    c = minbox_from_coords(xy, np.array([len(xy)], np.int64), np.zeros(1), np.zeros(1), 300.0)
    np.testing.assert_allclose(c[0], expected, atol=1e-6)


def test_pieces_without_vertices_map_to_the_tile_centre_and_corners_clamp():
    c = minbox_corners(np.array([shapely.Polygon(), shapely.box(-30, -30, 30, 30)]), np.zeros(2), np.zeros(2))
    np.testing.assert_allclose(c[0], [0.5] * 8)
    assert c[1].min() == 0.0 and c[1].max() == pytest.approx(0.1)


def test_many_vertices_on_a_circle():
    circle = shapely.Point(150, 150).buffer(100, quad_segs=2048)  # 8 k hull vertices: calipers, not pairs
    c = minbox_corners(np.array([circle]), np.zeros(1), np.zeros(1))
    assert _quad_area(c)[0] * 300**2 == pytest.approx(shapely.oriented_envelope(circle).area, rel=1e-6)


def _exhaustive_min_area(points: np.ndarray) -> tuple[float, float]:
    """(area, perimeter) of the smallest rectangle over every point-pair direction (a minimum
    rectangle has a side on a hull edge, and every hull edge joins two of the points)."""
    i, j = np.triu_indices(len(points), 1)
    d = points[j] - points[i]
    norm = np.hypot(d[:, 0], d[:, 1])
    u = d[norm > 0] / norm[norm > 0, None]
    a = u @ points.T
    b = np.stack([-u[:, 1], u[:, 0]], axis=1) @ points.T
    width, height = a.max(1) - a.min(1), b.max(1) - b.min(1)
    best = int(np.argmin(width * height))
    return float(width[best] * height[best]), float(2 * (width[best] + height[best]))


def test_multipart_pieces_match_an_exhaustive_search():
    # GEOS oriented_envelope returned rectangles that miss parts of some multipart pieces
    # (3 of Liechtenstein's 27,707); the kernel is checked against brute force instead
    rng = np.random.default_rng(2)
    shapes = []
    for _ in range(200):
        parts = [shapely.Point(rng.uniform(0, 300, 2)) for _ in range(int(rng.integers(1, 4)))]
        parts += [shapely.LineString(rng.uniform(0, 300, (int(rng.integers(2, 12)), 2))) for _ in range(int(rng.integers(1, 4)))]
        shapes.append(shapely.GeometryCollection(parts) if len(shapes) % 2 else
                      shapely.MultiLineString([p for p in parts if p.geom_type == "LineString"]))
    shapes = np.array(shapes, dtype=object)
    origin = np.full(len(shapes), -1000.0)
    ours = _quad_area(minbox_corners(shapes, origin, origin, tile_size_m=3000.0)) * 3000.0**2
    brute, perimeter = np.array([_exhaustive_min_area(shapely.get_coordinates(s)) for s in shapes]).T
    tolerance = 2 * perimeter * 3000.0 * 2.0**-24 + 1e-9  # float32 corners, as in the GEOS comparison above
    assert np.all(np.abs(ours - brute) <= tolerance)


def test_covers_a_piece_that_geos_gets_wrong():
    piece = shapely.from_wkt(ROUTE_PIECE_WKT)
    assert not shapely.contains(shapely.buffer(shapely.oriented_envelope(piece), 1e-6), piece)  # the GEOS bug
    rect = shapely.Polygon(min_rect_corners_m(np.array([piece]))[0])
    assert shapely.contains(shapely.buffer(rect, 1e-6), piece)
    assert rect.area == pytest.approx(_exhaustive_min_area(shapely.get_coordinates(piece))[0], rel=1e-9)
