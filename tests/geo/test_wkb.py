import numpy as np
import pyarrow as pa
import shapely

from geojepa_pipeline.geo.wkb import surely_valid, wkb_array


def _mixed_pieces() -> np.ndarray:
    rng = np.random.default_rng(0)
    out = []
    for k in range(600):
        pts = rng.normal(size=(int(rng.integers(5, 30)), 2)) * 20 + 150
        kind = k % 6
        if kind == 0:
            out.append(shapely.Point(pts[0]))
        elif kind == 1:
            out.append(shapely.LineString(pts))
        elif kind == 2:
            out.append(shapely.convex_hull(shapely.MultiPoint(pts)))
        elif kind == 3:  # a polygon with a hole
            out.append(shapely.Point(pts[0]).buffer(10).difference(shapely.Point(pts[0]).buffer(3)))
        elif kind == 4:
            out.append(shapely.MultiLineString([pts[:3], pts[3:]] if k % 12 else [pts]))  # 1 or 2 parts
        else:
            out.append(shapely.GeometryCollection([shapely.Point(pts[0]), shapely.LineString(pts[1:4])]))
    out += [shapely.Polygon(), shapely.LineString(), shapely.MultiLineString(), shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)])]
    return np.array(out, dtype=object)


def test_bytes_match_geos():
    pieces = _mixed_pieces()
    arr = wkb_array(pieces, shapely.get_type_id(pieces), shapely.get_coordinates(pieces),
                    shapely.get_num_coordinates(pieces).astype(np.int64))
    assert arr.type == pa.binary() and len(arr) == len(pieces)
    assert arr.to_pylist() == list(shapely.to_wkb(pieces, output_dimension=2))
    back = shapely.from_wkb(arr.to_numpy(zero_copy_only=False))
    assert shapely.equals_exact(back[:600], pieces[:600], tolerance=0).all()


def test_empty_input():
    arr = wkb_array(np.empty(0, dtype=object), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    assert len(arr) == 0 and arr.type == pa.binary()


def test_moved_coordinates_are_what_gets_written():
    pieces = _mixed_pieces()
    xy = shapely.get_coordinates(pieces) - np.array([100.0, 50.0])  # e.g. into a tile's frame
    arr = wkb_array(pieces, shapely.get_type_id(pieces), xy, shapely.get_num_coordinates(pieces).astype(np.int64))
    expected = shapely.to_wkb(shapely.transform(pieces, lambda c: c - np.array([100.0, 50.0])), output_dimension=2)
    assert arr.to_pylist() == list(expected)


def test_surely_valid_never_passes_what_geos_finds_invalid():
    inf, nan = np.inf, np.nan
    cases = [  # (geometry, surely valid from its bytes)
        (shapely.Point(1, 2), True), (shapely.Point(inf, 1), False), (shapely.from_wkt("POINT EMPTY"), False),
        (shapely.LineString([(0, 0), (1, 1)]), True), (shapely.LineString([(0, 0), (0, 0)]), False),
        (shapely.LineString([(0, 0), (0, 0), (1, 0)]), True), (shapely.LineString([(0, 0), (-0.0, 0)]), False),
        (shapely.LineString([(0, 0), (nan, 1)]), False), (shapely.from_wkt("LINESTRING EMPTY"), False),
        (shapely.MultiLineString([[(0, 0), (1, 1)], [(2, 2), (3, 3)]]), True),
        (shapely.MultiLineString([[(0, 0), (1, 1)], [(2, 2), (2, 2)]]), False),
        (shapely.box(0, 0, 1, 1), False),  # polygons: always GEOS
        (shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)]), False),
    ]
    geoms = np.array([g for g, _ in cases], object)
    with np.errstate(invalid="ignore"):
        wkb = pa.array(list(shapely.to_wkb(geoms, output_dimension=2)), pa.binary())
    sure = surely_valid(wkb)
    assert list(sure) == [s for _, s in cases]
    assert shapely.is_valid(geoms[sure]).all()
    # the pieces of a real mix, and a sliced array (an offset into the buffers)
    pieces = _mixed_pieces()
    wkb = pa.array(list(shapely.to_wkb(pieces, output_dimension=2)), pa.binary())
    sure = surely_valid(wkb)
    assert shapely.is_valid(pieces[sure]).all() and sure.sum() >= len(pieces) // 3
    assert list(surely_valid(wkb.slice(7, 50))) == list(sure[7:57])
    assert len(surely_valid(pa.array([], pa.binary()))) == 0
