"""naip_scenes + tile_images end to end on a small region: local globs, STAC over real HTTP, bad inputs."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.geo.synthetic import colorize, write_cog
from geojepa_pipeline.stages.imagery import build_naip_scenes, build_tile_images, decode_chip
from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
from geojepa_pipeline.regions import Region
from geojepa_pipeline.store import IMAGES, SCENES, Store

from ..conftest import visible_datasets


@pytest.fixture(scope="module")
def tiled_store(tmp_path_factory):
    """A store holding the tile shards of pyrosm's test extract (70 tiles, EPSG:32635)."""
    root = tmp_path_factory.mktemp("store")
    store = Store(root)
    region = Region.create("t", "pyrosm:test")
    fetch_extract(region, store)
    build_tile_shards("t", store)
    return root


@pytest.fixture
def store(tiled_store, tmp_path):
    """A private copy, so each test starts from tile shards only."""
    shutil.copytree(tiled_store, tmp_path / "store")
    return Store(tmp_path / "store")


def region_extent(store: Store) -> tuple[int, float, float, float, float]:
    ds = store.current("tiles", "t")
    t = pq.read_table(ds.path / ds.manifest["shards"][0]["tiles_file"])
    x, y = t.column("x_min_m").to_numpy(), t.column("y_min_m").to_numpy()
    return ds.manifest["epsg"], x.min(), y.min(), x.max() + 300, y.max() + 300


def write_region_cog(path: Path, store: Store, count: int = 4, nodata=None, offset_m: float = 0.0, value=None) -> Path:
    """A COG at 1 m over the region's tiles (shifted east by ``offset_m``)."""
    epsg, x0, y0, x1, y1 = region_extent(store)
    w, h = int(x1 - x0) + 20, int(y1 - y0) + 20
    if value is None:
        classes = np.zeros((h, w), np.uint8)
        classes[:, : w // 3] = 3
        image = colorize(classes, np.random.default_rng(0))[:count]
    else:
        image = np.full((count, h, w), value, np.uint8)
    if nodata is None and count == 4:
        write_cog(path, image, epsg, x0 - 10 + offset_m, y1 + 10, 1.0, "2021-07-01")
    else:
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype="uint8", nodata=nodata,
                           crs=f"EPSG:{epsg}", transform=from_origin(x0 - 10 + offset_m, y1 + 10, 1.0, 1.0), tiled=True) as dst:
            dst.write(image)
    return path


def images_table(store: Store):
    ds = store.current(IMAGES, "t")
    return pq.read_table(ds.path / ds.manifest["shards"][0]["images_file"]), ds


def test_local_glob_chips_every_tile(store, tmp_path):
    (tmp_path / "naip").mkdir()
    cog = write_region_cog(tmp_path / "naip" / "m_1_20210701.tif", store)
    region = Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif"))
    scenes = build_naip_scenes(region, store)
    assert [s.scene_id for s in scenes.scenes] == ["m_1_20210701"] and not scenes.warnings
    assert scenes.scenes[0].path == str(cog) and scenes.scenes[0].acquired == "2021-07-01"
    result = build_tile_images("t", store)
    table, ds = images_table(store)
    tiles_ds = store.current("tiles", "t")
    tiles = pq.read_table(tiles_ds.path / tiles_ds.manifest["shards"][0]["tiles_file"])
    assert table.column("tile_id").equals(tiles.column("tile_id"))  # same order as the tile shard
    assert result.n_tiles == result.n_with_image == tiles.num_rows
    assert min(table.column("coverage").to_pylist()) == 1.0
    chip = decode_chip(table.column("image")[0].as_py())
    assert chip.shape == (224, 224, 4) and chip.std() > 0
    assert ds.manifest["inputs"] == {"tile_shards": tiles_ds.data_version, "naip_scenes": scenes.dataset.data_version}
    # an unchanged re-run gives the same data versions
    assert build_naip_scenes(region, store).dataset.data_version == scenes.dataset.data_version
    assert build_tile_images("t", store).dataset.data_version == ds.data_version


def test_raster_elsewhere_warns_and_tile_images_keeps_its_good_version(store, tmp_path):
    """A valid GeoTIFF 50 km away: naip_scenes warns; tile_images fails with one line and keeps the chips it had."""
    (tmp_path / "near").mkdir(), (tmp_path / "naip").mkdir()
    write_region_cog(tmp_path / "near" / "m_1_20210701.tif", store)
    build_naip_scenes(Region.create("t", "pyrosm:test", imagery=str(tmp_path / "near" / "*.tif")), store)
    good = build_tile_images("t", store).dataset
    write_region_cog(tmp_path / "naip" / "far.tif", store, offset_m=50_000)
    region = Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif"))
    logs = []
    scenes = build_naip_scenes(region, store, log=logs.append)
    assert len(scenes.warnings) == 1 and "coverage 0" in scenes.warnings[0]
    with pytest.raises(GeojepaError, match=rf"no tile of region 't' is covered by its 1 scene\(s\) from '.*naip/\*.tif' \(naip_scenes "
                                           rf"{scenes.dataset.data_version}\): every chip would be empty, so tile_images keeps its "
                                           rf"current version {good.data_version}; check that the rasters lie over the region"):
        build_tile_images("t", store, log=logs.append)
    assert store.current(IMAGES, "t") == good and store.versions(IMAGES, "t") == [good.data_version]
    table, _ = images_table(store)
    assert table.num_rows == 70 and table.column("has_image").to_pylist() == [True] * 70  # still the good chips


def test_three_band_raster_is_kept_without_nir(store, tmp_path):
    (tmp_path / "naip").mkdir()
    write_region_cog(tmp_path / "naip" / "rgb.tif", store, count=3, value=90)
    region = Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif"))
    build_naip_scenes(region, store)
    build_tile_images("t", store)
    table, _ = images_table(store)
    assert not any(table.column("has_nir").to_pylist()) and all(table.column("has_image").to_pylist())
    chip = decode_chip(table.column("image")[3].as_py())
    assert (chip[..., :3] == 90).all() and (chip[..., 3] == 0).all()


def test_nodata_value_is_counted_in_coverage(store, tmp_path):
    (tmp_path / "naip").mkdir()
    path = write_region_cog(tmp_path / "naip" / "nd.tif", store, nodata=0, value=120)
    with rasterio.open(path, "r+") as dst:  # the western 40 % is nodata
        data = dst.read()
        data[:, :, : int(dst.width * 0.4)] = 0
        dst.write(data)
    region = Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif"))
    build_naip_scenes(region, store)
    result = build_tile_images("t", store)
    table, _ = images_table(store)
    cov = np.array(table.column("coverage").to_pylist())
    assert (cov == 0).any() and (cov == 1).any() and 0.2 < result.coverage_mean < 0.8
    assert result.n_with_image == int((cov > 0).sum())


@pytest.mark.parametrize("damage", ["garbage", "truncated_pixels"])
def test_corrupt_tiff_gives_clear_error_and_no_partial_shards(store, tmp_path, damage):
    (tmp_path / "naip").mkdir()
    path = write_region_cog(tmp_path / "naip" / "bad.tif", store)
    if damage == "garbage":
        path.write_bytes(b"II*\x00" + b"\x17" * 5000)
    else:  # headers and overviews intact, the full-resolution blocks at the end of the COG cut off
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.7)])
    region = Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif"))
    with pytest.raises(GeojepaError) as err:
        build_naip_scenes(region, store)
        build_tile_images("t", store, workers=1)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert visible_datasets(store.root, IMAGES) == [] and store.current(IMAGES, "t") is None
    assert not list(store.root.rglob("images-*.parquet"))  # nothing half-written, staging included
    if damage == "truncated_pixels":  # the header was fine: naip_scenes committed, tile_images failed reading pixels
        assert "cannot read pixels" in str(err.value)


def test_scene_changed_after_naip_scenes_is_refused(store, tmp_path):
    (tmp_path / "naip").mkdir()
    path = write_region_cog(tmp_path / "naip" / "a.tif", store)
    build_naip_scenes(Region.create("t", "pyrosm:test", imagery=str(tmp_path / "naip" / "*.tif")), store)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(GeojepaError, match="changed since naip_scenes"):
        build_tile_images("t", store)


def test_empty_glob_is_refused(store, tmp_path):
    with pytest.raises(GeojepaError, match="matches no files"):
        build_naip_scenes(Region.create("t", "pyrosm:test", imagery=str(tmp_path / "nothing" / "*.tif")), store)
    assert visible_datasets(store.root, SCENES) == []


# ---- STAC over real HTTP ------------------------------------------------------------------

class StacApi:
    """A small STAC API on 127.0.0.1: landing page, /search (GET and POST, bbox filter), files."""

    def __init__(self, root: Path):
        self.root, self.items, self.requests = root, [], []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _search(self, params):
                api.requests.append(params)
                bbox = params.get("bbox")
                if isinstance(bbox, str):
                    bbox = [float(v) for v in bbox.split(",")]
                hits = [it for it in api.items if not bbox or (
                    it["bbox"][0] < bbox[2] and it["bbox"][2] > bbox[0] and it["bbox"][1] < bbox[3] and it["bbox"][3] > bbox[1])]
                self._json({"type": "FeatureCollection", "features": hits, "links": []})

            def do_GET(self):
                url = urlparse(self.path)
                if url.path in ("/", ""):
                    return self._json(api.landing())
                if url.path == "/search":
                    return self._search({k: v[0] for k, v in parse_qs(url.query).items()})
                file = api.root / url.path.lstrip("/")
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self._search(json.loads(self.rfile.read(length) or b"{}"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def landing(self):
        return {
            "type": "Catalog", "id": "test-stac", "description": "test", "stac_version": "1.0.0",
            "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
            "links": [{"rel": "self", "href": self.url + "/"}, {"rel": "root", "href": self.url + "/"},
                      {"rel": "search", "href": self.url + "/search", "type": "application/geo+json", "method": "GET"}],
        }

    def add_item(self, item_id: str, date: str, cog: Path):
        with rasterio.open(cog) as src:
            w, s, e, n = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        self.items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "naip",
            "bbox": [w, s, e, n],
            "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
            "properties": {"datetime": f"{date}T00:00:00Z"},
            "assets": {"image": {"href": f"{self.url}/{cog.name}", "type": "image/tiff; application=geotiff; profile=cloud-optimized"}},
            "links": [],
        })

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_stac_search_downloads_newest_scene_over_real_http(store, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    api = StacApi(www)
    try:
        old = write_region_cog(www / "old.tif", store, value=40)
        new = write_region_cog(www / "new.tif", store)
        far = write_region_cog(www / "far.tif", store, offset_m=80_000)
        api.add_item("tt_m_1_2018", "2018-06-01", old)
        api.add_item("tt_m_1_2022", "2022-06-01", new)
        api.add_item("elsewhere_2022", "2022-06-01", far)
        region = Region.create("t", "pyrosm:test", imagery="stac")
        scenes = build_naip_scenes(region, store, stac_endpoint=api.url)
        # the newest acquisition per area; the item outside the bbox is not returned by the search
        assert [s.scene_id for s in scenes.scenes] == ["tt_m_1_2022"]
        assert scenes.scenes[0].acquired == "2022-06-01" and scenes.scenes[0].count == 4
        stored = Path(scenes.scenes[0].path)
        assert stored.parent == scenes.dataset.path and stored.read_bytes() == new.read_bytes()
        assert api.requests and "naip" in str(api.requests[0].get("collections"))
        w, s, e, n = (float(v) for v in str(api.requests[0]["bbox"]).strip("[]").split(","))
        epsg, x0, y0, x1, y1 = region_extent(store)
        lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform((x0 + x1) / 2, (y0 + y1) / 2)
        assert w < lon < e and s < lat < n
        result = build_tile_images("t", store)
        assert result.n_with_image == result.n_tiles == 70 and result.scene_use == {"tt_m_1_2022": 70}
        # a year filter reaches the API as a datetime range
        build_naip_scenes(region, store, stac_endpoint=api.url, stac_year=2018)
        assert "2018-01-01" in str(api.requests[-1].get("datetime"))
    finally:
        api.close()


def test_stac_endpoint_down_is_one_line_error(store, closed_port):
    region = Region.create("t", "pyrosm:test", imagery="stac")
    with pytest.raises(GeojepaError) as err:
        build_naip_scenes(region, store, stac_endpoint=f"http://127.0.0.1:{closed_port}/api")
    assert "\n" not in str(err.value) and "127.0.0.1" in str(err.value)
    assert visible_datasets(store.root, SCENES) == []
