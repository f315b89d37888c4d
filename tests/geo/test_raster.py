"""Chipping: georeferencing across CRSs, a real 4-band raster, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.raster import CHIP_PX, SceneChipper, inspect_scene, newest_first
from geojepa_pipeline.store import sha256_file
from tests.conftest import SHARED_DATA

TILE_EPSG = 32632
TILE_X0, TILE_Y0, TILE = 510_000.0, 5_100_000.0, 300.0  # a tile of EPSG:32632 (near 9.13 E, 46.05 N)
SQUARE_CENTRE = (TILE_X0 + 100.5, TILE_Y0 + 200.5)  # tile-local (100.5, 200.5) m
SQUARE_M = 30.0
BRIGHT = (250, 200, 150, 100)
DARK = (10, 20, 30, 40)


def write_square_raster(path, crs: str, res: float, size_px: int = 900):
    """A 4-band uint8 raster in ``crs`` around the test tile, bright where the 30 m UTM square is."""
    to_crs = Transformer.from_crs(TILE_EPSG, crs, always_xy=True)
    cx, cy = to_crs.transform(TILE_X0 + TILE / 2, TILE_Y0 + TILE / 2)
    left, top = cx - size_px / 2 * res, cy + size_px / 2 * res
    transform = from_origin(left, top, res, res)
    cols, rows = np.meshgrid(np.arange(size_px) + 0.5, np.arange(size_px) + 0.5)
    xs, ys = left + cols * res, top - rows * res
    ux, uy = Transformer.from_crs(crs, TILE_EPSG, always_xy=True).transform(xs, ys)
    inside = (np.abs(ux - SQUARE_CENTRE[0]) < SQUARE_M / 2) & (np.abs(uy - SQUARE_CENTRE[1]) < SQUARE_M / 2)
    data = np.empty((4, size_px, size_px), np.uint8)
    for b in range(4):
        data[b] = np.where(inside, BRIGHT[b], DARK[b])
    with rasterio.open(path, "w", driver="GTiff", width=size_px, height=size_px, count=4, dtype="uint8",
                       crs=crs, transform=transform, tiled=True) as dst:
        dst.write(data)
    return path


def scene(path, **kw):
    return inspect_scene(path, sha256_file(path), **kw)


@pytest.mark.parametrize("crs,res", [("EPSG:4326", 1e-5), ("EPSG:32631", 0.6)])
def test_square_lands_at_expected_pixel(tmp_path, crs, res):
    path = write_square_raster(tmp_path / "square.tif", crs, res)
    with SceneChipper([scene(path)], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    assert chip.image.shape == (CHIP_PX, CHIP_PX, 4) and chip.image.dtype == np.uint8
    assert chip.coverage == 1.0 and chip.has_nir
    bright = chip.image[..., 0] > 130
    rows, cols = np.nonzero(bright)
    px_m = TILE / CHIP_PX
    expect_col = (SQUARE_CENTRE[0] - TILE_X0) / px_m - 0.5  # pixel index of the centre
    expect_row = (TILE_Y0 + TILE - SQUARE_CENTRE[1]) / px_m - 0.5  # row 0 is north
    assert abs(cols.mean() - expect_col) <= 2 and abs(rows.mean() - expect_row) <= 2
    width_px = cols.max() - cols.min() + 1
    assert abs(width_px - SQUARE_M / px_m) <= 2
    # band order kept: the middle of the square has the bright value of every band
    r, c = int(round(expect_row)), int(round(expect_col))
    assert np.abs(chip.image[r, c].astype(int) - np.array(BRIGHT)).max() <= 2
    assert np.abs(chip.image[5, 5].astype(int) - np.array(DARK)).max() <= 2


HAITI = SHARED_DATA / "rasters" / "rgbn-haiti-5m.tif"


@pytest.mark.skipif(not HAITI.exists(), reason="../shared/data is not present")
def test_real_raster_chips_match_source_windows():
    info = scene(HAITI)
    assert info.crs == "EPSG:32618" and info.count == 4 and info.dtype == "uint8" and info.rescale is None
    left, bottom, right, top = info.bounds
    # 300 m tiles wholly inside the footprint
    xs = np.arange(np.ceil(left / TILE) * TILE, right - TILE + 1e-6, TILE)
    ys = np.arange(np.ceil(bottom / TILE) * TILE, top - TILE + 1e-6, TILE)
    assert len(xs) * len(ys) >= 20
    with rasterio.open(HAITI) as src, SceneChipper([info], 32618) as chipper:
        for x0 in xs[:4]:
            for y0 in ys[:5]:
                chip = chipper.chip(x0, y0, TILE)
                assert chip.coverage == 1.0 and chip.scene_ids == [info.scene_id]
                window = rasterio.windows.from_bounds(x0, y0, x0 + TILE, y0 + TILE, transform=src.transform)
                source = src.read(window=window.round_offsets().round_lengths())  # (4, 60, 60) at 5 m
                assert chip.image.std() > 0
                # band order and statistics: per-band means agree to within 2 DN, stds within 15 %
                for b in range(4):
                    assert abs(chip.image[..., b].mean() - source[b].mean()) < 2.0, b
                    assert abs(chip.image[..., b].std() - source[b].std()) < 0.15 * source[b].std() + 1, b
                # the per-band ordering of means is that of the source (R, G, B, NIR kept in place)
                assert list(np.argsort(chip.image.reshape(-1, 4).mean(0))) == list(np.argsort(source.reshape(4, -1).mean(1)))


def test_raster_outside_the_tile_gives_zero_coverage(tmp_path):
    path = write_square_raster(tmp_path / "square.tif", "EPSG:32632", 0.6)
    with SceneChipper([scene(path)], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0 + 30_000, TILE_Y0, TILE)
    assert chip.coverage == 0.0 and chip.scene_ids == [] and not chip.image.any() and not chip.has_nir


def test_nodata_value_counts_against_coverage(tmp_path):
    path = tmp_path / "nodata.tif"
    data = np.full((4, 600, 600), 90, np.uint8)
    data[:, :, :300] = 0  # western half is nodata
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=4, dtype="uint8", nodata=0,
                       crs="EPSG:32632", transform=from_origin(TILE_X0 - 30, TILE_Y0 + TILE + 30, 0.6, 0.6)) as dst:
        dst.write(data)
    with SceneChipper([scene(path)], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    # nodata covers x < TILE_X0 - 30 + 180 m = 150 m into the tile: half of it
    assert abs(chip.coverage - 0.5) < 0.02
    assert chip.image[:, 200:, 0].min() == 90


def test_three_band_scene_has_no_nir(tmp_path):
    path = tmp_path / "rgb.tif"
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(TILE_X0 - 30, TILE_Y0 + TILE + 30, 0.6, 0.6)) as dst:
        dst.write(np.full((3, 600, 600), 77, np.uint8))
    info = scene(path)
    assert not info.has_nir
    with SceneChipper([info], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    assert chip.coverage == 1.0 and not chip.has_nir
    assert (chip.image[..., :3] == 77).all() and (chip.image[..., 3] == 0).all()


def test_uint16_scene_is_rescaled(tmp_path):
    path = tmp_path / "u16.tif"
    ramp = np.tile(np.linspace(0, 4000, 600, dtype=np.float64), (600, 1)).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=4, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(TILE_X0 - 30, TILE_Y0 + TILE + 30, 0.6, 0.6)) as dst:
        dst.write(np.stack([ramp] * 4))
    info = scene(path)
    assert info.rescale is not None and info.rescale[0][1] > 3900
    with SceneChipper([info], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    assert chip.image[..., 0][:, 0].mean() < 30 and chip.image[..., 0][:, -1].mean() > 200


@pytest.mark.parametrize("kind", ["garbage", "truncated", "one_band", "no_crs"])
def test_bad_scenes_are_refused_with_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.tif"
    if kind == "garbage":
        path.write_bytes(b"not a tiff at all" * 100)
    elif kind == "truncated":
        good = write_square_raster(tmp_path / "good.tif", "EPSG:32632", 0.6, size_px=1200)
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        count, crs = (1, "EPSG:32632") if kind == "one_band" else (4, None)
        with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=count, dtype="uint8",
                           crs=crs, transform=from_origin(0, 64, 1, 1)) as dst:
            dst.write(np.ones((count, 64, 64), np.uint8))
    with pytest.raises(GeojepaError) as err:
        info = scene(path)
        with SceneChipper([info], TILE_EPSG) as chipper:  # a cut-off file may only fail when its pixels are read
            for dx in range(0, 720, 300):
                for dy in range(0, 720, 300):
                    chipper.chip(TILE_X0 - 200 + dx, TILE_Y0 - 200 + dy, TILE)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg


def test_newest_first_orders_by_acquisition(tmp_path):
    a = write_square_raster(tmp_path / "m_4609101_ne_32_060_20180827.tif", "EPSG:32632", 0.6, size_px=100)
    b = write_square_raster(tmp_path / "m_4609101_ne_32_060_20220601.tif", "EPSG:32632", 0.6, size_px=100)
    c = write_square_raster(tmp_path / "undated.tif", "EPSG:32632", 0.6, size_px=100)
    order = [s.acquired for s in newest_first([scene(a), scene(c), scene(b)])]
    assert order == ["2022-06-01", "2018-08-27", None]


def test_same_crs_fast_path_agrees_with_gdal_warp(tmp_path):
    """Same-CRS tiles are resampled in numpy from the nearest finer overview; GDAL's warper is the reference."""
    from rasterio.warp import Resampling, reproject

    from geojepa_pipeline.geo.raster import tile_transform
    from geojepa_pipeline.geo.synthetic import colorize, write_cog

    classes = np.zeros((1000, 1000), np.uint8)
    classes[100:400, 200:900] = 3
    classes[500:520, :] = 8
    classes[600:900, 100:300] = 10
    image = colorize(classes, np.random.default_rng(1))
    path = tmp_path / "cog.tif"
    write_cog(path, image, TILE_EPSG, TILE_X0 - 150, TILE_Y0 + TILE + 150, 0.6, "2021-05-01")
    with rasterio.open(path) as src:
        assert src.overviews(1)[0] == 2  # the chip grid (1.34 m) reads the 1.2 m overview
        reference = np.zeros((4, CHIP_PX, CHIP_PX), np.float32)
        reproject(src.read(), reference, src_transform=src.transform, src_crs=src.crs,
                  dst_transform=tile_transform(TILE_X0, TILE_Y0, TILE), dst_crs=src.crs, resampling=Resampling.bilinear)
    with SceneChipper([scene(path)], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    ours = chip.image.transpose(2, 0, 1).astype(np.float32)
    assert chip.coverage == 1.0 and chip.scene_ids and chip.has_nir
    assert np.abs(ours.mean(axis=(1, 2)) - reference.mean(axis=(1, 2))).max() < 1.0
    assert np.abs(ours - reference).mean() < 4.0
    # edges line up: the road (a 12 m east-west stripe) sits on the same chip rows
    road_rows = lambda a: set(np.flatnonzero(np.abs(a[0].mean(axis=1) - 84) < 12))  # noqa: E731
    assert len(road_rows(ours) ^ road_rows(reference)) <= 2


def test_tile_over_a_scene_edge_matches_gdal_on_the_covered_part(tmp_path):
    """Edge tiles take the numpy path (exact pixel-centre coverage); GDAL's warper is the reference."""
    from rasterio.warp import Resampling, reproject

    from geojepa_pipeline.geo.raster import tile_transform
    from geojepa_pipeline.geo.synthetic import colorize, write_cog

    classes = np.zeros((1000, 1000), np.uint8)
    classes[:, 500:] = 2
    classes[300:320, :] = 8
    path = tmp_path / "edge.tif"
    write_cog(path, colorize(classes, np.random.default_rng(2)), TILE_EPSG, TILE_X0 - 450, TILE_Y0 + TILE + 150, 0.6, "2021-05-01")
    # the scene ends 150 m into the tile: its eastern half is uncovered
    with rasterio.open(path) as src:
        reference = np.full((4, CHIP_PX, CHIP_PX), np.nan, np.float32)
        reproject(src.read(), reference, src_transform=src.transform, src_crs=src.crs, dst_nodata=np.nan,
                  dst_transform=tile_transform(TILE_X0, TILE_Y0, TILE), dst_crs=src.crs, resampling=Resampling.bilinear)
    with SceneChipper([scene(path)], TILE_EPSG) as chipper:
        chip = chipper.chip(TILE_X0, TILE_Y0, TILE)
    assert abs(chip.coverage - 0.5) < 0.01
    covered = ~np.isnan(reference).any(axis=0)
    assert abs(covered.mean() - chip.coverage) < 0.01
    ours = chip.image.transpose(2, 0, 1).astype(np.float32)
    assert np.abs(ours[:, covered] - reference[:, covered]).mean() < 4.0
    assert not chip.image[:, 120:].any()  # uncovered pixels stay 0
