"""Aerial scenes and per-tile chips: validate GeoTIFF/COG scenes, warp windows onto 300 m tiles.

A *scene* is one georeferenced raster file (a NAIP quarter quad, a synthetic block, any
GeoTIFF/COG). A *chip* is the ``CHIP_PX`` x ``CHIP_PX`` x 4 uint8 image (R, G, B, NIR) of one
tile: the tile's UTM square, warped bilinearly from whichever scenes cover it, newest first.

Only windows are read: for each (tile, scene) pair the tile's square is transformed into the
scene's CRS, padded by a few source pixels, and that window alone is read and warped.

Input handling (documented, checked in ``inspect_scene``):
- a scene needs a CRS and at least 3 bands; bands 1-3 are R, G, B and band 4, if present, NIR.
- 3-band (RGB) scenes are accepted: the chip's NIR channel is 0 and ``has_nir`` is False.
- uint8 is taken as is. Any other dtype is rescaled linearly per band from its 0.5th..99.5th
  percentile (of a decimated read, ignoring nodata) to 0..255; the bounds go in the manifest.
- the scene's nodata value, where set, marks pixels as not covered; ``coverage`` is the
  fraction of chip pixels with data in every band.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from ..errors import GeojepaError

# reproject() between numpy arrays warns about its internal in-memory datasets; ours carry transforms
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.warp")

CHIP_PX = 224
BANDS = ("red", "green", "blue", "nir")
_PAD_PX = 2  # extra source pixels around a window, for the bilinear kernel
_DATE_IN_NAME = re.compile(r"(?<!\d)((?:19|20)\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?!\d)")


@dataclass(frozen=True)
class SceneInfo:
    """Facts about one scene, as recorded in the ``naip_scenes`` manifest.

    ``bounds`` are in the scene's CRS (left, bottom, right, top); ``res_m`` is the pixel size in
    CRS units; ``acquired`` an ISO date or None (then it sorts as oldest).
    """

    scene_id: str
    path: str
    sha256: str
    crs: str
    bounds: tuple[float, float, float, float]
    bounds_lonlat: tuple[float, float, float, float]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    res: tuple[float, float]
    acquired: str | None
    rescale: list[tuple[float, float]] | None = None  # per band (lo, hi) when dtype is not uint8
    extra: dict = field(default_factory=dict)

    @property
    def has_nir(self) -> bool:
        return self.count >= 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bounds"], d["bounds_lonlat"], d["res"] = list(self.bounds), list(self.bounds_lonlat), list(self.res)
        return d

    @staticmethod
    def from_dict(d: dict) -> "SceneInfo":
        d = dict(d)
        d["bounds"], d["bounds_lonlat"], d["res"] = tuple(d["bounds"]), tuple(d["bounds_lonlat"]), tuple(d["res"])
        if d.get("rescale") is not None:
            d["rescale"] = [tuple(r) for r in d["rescale"]]
        return SceneInfo(**d)


def _crs_string(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def acquisition_date(tags: dict, name: str) -> str | None:
    """The acquisition date: TIFFTAG_DATETIME (``YYYY:MM:DD …``), else a ``YYYYMMDD`` in the file name (NAIP style)."""
    stamp = (tags or {}).get("TIFFTAG_DATETIME", "")
    m = re.match(r"(\d{4})[:-](\d{2})[:-](\d{2})", stamp)
    if m:
        return f"{m[1]}-{m[2]}-{m[3]}"
    m = _DATE_IN_NAME.search(name)
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def _percentile_rescale(src, nodata) -> list[tuple[float, float]]:
    """Per band (0.5th, 99.5th) percentiles of a decimated read (at most ~1024 px on a side)."""
    step = max(1, max(src.width, src.height) // 1024)
    shape = (src.count, max(1, src.height // step), max(1, src.width // step))
    data = src.read(out_shape=shape, resampling=Resampling.nearest).astype(np.float64)
    out = []
    for band in data[:4]:
        vals = band[np.isfinite(band)]
        if nodata is not None:
            vals = vals[vals != nodata]
        if vals.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(vals, [0.5, 99.5])
        out.append((float(lo), float(hi if hi > lo else lo + 1.0)))
    return out


def inspect_scene(path: str | Path, sha256: str, scene_id: str | None = None, acquired: str | None = None) -> SceneInfo:
    """Open and validate one scene; raise a one-line ``GeojepaError`` naming the file if unusable.

    Checks: GDAL can open it and decode a decimated read (catches truncated/garbage files in
    most cases; a damaged block elsewhere is caught when its window is read), a CRS, >= 3 bands.
    """
    path = Path(path)
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise GeojepaError(f"scene {path} has no CRS; georeference it (e.g. gdal_edit.py -a_srs EPSG:XXXX) or drop it from the glob")
            if src.count < 3:
                raise GeojepaError(f"scene {path} has {src.count} band(s); need at least 3 (R, G, B[, NIR])")
            nodata = src.nodata
            dtype = src.dtypes[0]
            # decode a small overview-backed read: a garbage or cut-off file fails here
            src.read(1, out_shape=(max(1, src.height // 64), max(1, src.width // 64)))
            rescale = None if dtype == "uint8" else _percentile_rescale(src, nodata)
            bounds = tuple(float(v) for v in src.bounds)
            lonlat = transform_bounds(src.crs, "EPSG:4326", *bounds, densify_pts=21)
            return SceneInfo(
                scene_id=scene_id or path.stem, path=str(path), sha256=sha256, crs=_crs_string(src.crs),
                bounds=bounds, bounds_lonlat=tuple(float(v) for v in lonlat),
                width=src.width, height=src.height, count=src.count, dtype=dtype,
                nodata=None if nodata is None else float(nodata), res=(float(src.res[0]), float(src.res[1])),
                acquired=acquired or acquisition_date(src.tags(), path.name), rescale=rescale,
            )
    except GeojepaError:
        raise
    except (RasterioIOError, RasterioError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GeojepaError(f"scene {path} is not a readable GeoTIFF ({first}); re-download or remove it") from None


def newest_first(scenes: list[SceneInfo]) -> list[SceneInfo]:
    """Mosaic order: newest acquisition first; undated scenes last; ties by scene id."""
    def key(s: SceneInfo):
        stamp = datetime.fromisoformat(s.acquired).toordinal() if s.acquired else 0
        return (-stamp, s.scene_id)
    return sorted(scenes, key=key)


def tile_transform(x_min_m: float, y_min_m: float, tile_size_m: float, px: int = CHIP_PX):
    """Affine of a chip: row 0 is the tile's north edge; pixel size ``tile_size_m / px`` metres."""
    return from_origin(x_min_m, y_min_m + tile_size_m, tile_size_m / px, tile_size_m / px)


@dataclass
class Chip:
    """One tile's image. ``image``: (px, px, 4) uint8, R G B NIR, row 0 = north."""

    image: np.ndarray
    coverage: float  # fraction of pixels with data in every band, 0..1
    scene_ids: list[str]
    has_nir: bool


class SceneChipper:
    """Warps windows of a fixed set of scenes onto tiles of one UTM CRS.

    Holds open dataset handles: use one instance per thread (GDAL handles are not shared).
    """

    def __init__(self, scenes: list[SceneInfo], dst_epsg: int, px: int = CHIP_PX):
        self.scenes = newest_first(scenes)
        self.dst_crs = CRS.from_epsg(dst_epsg)
        self.px = px
        self._handles: dict[str, rasterio.io.DatasetReader] = {}
        # scene footprints in the tile CRS, for a quick overlap test
        self._dst_bounds = np.array(
            [transform_bounds(CRS.from_user_input(s.crs), self.dst_crs, *s.bounds, densify_pts=21) for s in self.scenes],
            dtype=np.float64,
        ).reshape(-1, 4)

    def _open(self, scene: SceneInfo):
        src = self._handles.get(scene.scene_id)
        if src is None:
            try:
                src = rasterio.open(scene.path)
            except RasterioIOError as exc:
                raise GeojepaError(f"scene {scene.path} cannot be opened ({str(exc).splitlines()[0]}); re-materialize naip_scenes") from None
            self._handles[scene.scene_id] = src
        return src

    def close(self) -> None:
        for src in self._handles.values():
            src.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def scenes_over(self, x_min: float, y_min: float, size: float) -> list[int]:
        b = self._dst_bounds
        hit = (b[:, 0] < x_min + size) & (b[:, 2] > x_min) & (b[:, 1] < y_min + size) & (b[:, 3] > y_min)
        return list(np.flatnonzero(hit))

    def _window(self, src, x_min: float, y_min: float, size: float, step: int = 1) -> Window | None:
        """Source window under the tile plus padding, snapped outward to multiples of ``step``; None if empty."""
        left, bottom, right, top = transform_bounds(self.dst_crs, src.crs, x_min, y_min, x_min + size, y_min + size, densify_pts=21)
        win = from_bounds(left, bottom, right, top, transform=src.transform)
        pad = _PAD_PX * step
        col0 = (max(int(np.floor(win.col_off)) - pad, 0) // step) * step
        row0 = (max(int(np.floor(win.row_off)) - pad, 0) // step) * step
        col1 = min(-(-(int(np.ceil(win.col_off + win.width)) + pad) // step) * step, src.width)
        row1 = min(-(-(int(np.ceil(win.row_off + win.height)) + pad) // step) * step, src.height)
        if col1 <= col0 or row1 <= row0:
            return None
        return Window(col0, row0, col1 - col0, row1 - row0)

    def _read(self, scene: SceneInfo, src, window: Window, step: int) -> np.ndarray:
        """(bands, h, w) pixels of ``window``, decimated by ``step`` (served by the overview of that factor)."""
        bands = list(range(1, min(src.count, 4) + 1))
        shape = (len(bands), -(-int(window.height) // step), -(-int(window.width) // step))
        try:
            if step == 1:
                return src.read(bands, window=window)
            return src.read(bands, window=window, out_shape=shape, resampling=Resampling.average)
        except (RasterioIOError, RasterioError) as exc:
            raise GeojepaError(f"scene {scene.path}: cannot read pixels ({str(exc).splitlines()[0]}); the file is damaged, re-download it") from None

    def _overview_step(self, src, dst_res: float) -> int:
        """The largest overview factor whose pixels are still finer than ``dst_res`` (1 = full resolution)."""
        src_res = abs(src.transform.a)
        steps = [f for f in (src.overviews(1) or []) if src_res * f <= dst_res * 1.0001]
        return max(steps, default=1)

    def _warp_same_crs(self, data: np.ndarray, left: float, top: float, res: float, nodata,
                       x_min: float, y_min: float, size: float) -> np.ndarray:
        """Bilinear resampling of a north-up array in the tile CRS onto the chip grid, in numpy.

        Same convention as GDAL's bilinear: the chip pixel centre maps to source coordinate u;
        the 4 pixels around u - 0.5 are weighted; nodata taps get weight 0 and the rest are
        renormalised; a chip pixel whose centre lies outside the source is NaN.
        Returns (bands, px, px) float32.
        """
        px = self.px
        nb, h, w = data.shape
        centres = (np.arange(px) + 0.5) * (size / px)
        u = (x_min + centres - left) / res  # source column coordinate of each chip column
        v = (top - (y_min + size - centres)) / res  # source row coordinate of each chip row
        inside = ((u >= 0) & (u < w))[None, :] & ((v >= 0) & (v < h))[:, None]
        u, v = u - 0.5, v - 0.5
        c0, r0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        fx, fy = (u - c0).astype(np.float32), (v - r0).astype(np.float32)
        cols = [np.clip(c0, 0, w - 1), np.clip(c0 + 1, 0, w - 1)]
        rows = [np.clip(r0, 0, h - 1), np.clip(r0 + 1, 0, h - 1)]
        wx = [1 - fx, fx]
        wy = [1 - fy, fy]
        if nodata is None:
            # separable: interpolate the two needed rows along x, then along y
            data = data.astype(np.float32, copy=False)
            x_interp = []
            for i in (0, 1):
                band_rows = data[:, rows[i], :]  # (bands, px, w)
                x_interp.append(np.take(band_rows, cols[0], axis=2) * wx[0] + np.take(band_rows, cols[1], axis=2) * wx[1])
            out = x_interp[0] * wy[0][:, None] + x_interp[1] * wy[1][:, None]
            out[:, ~inside] = np.nan
            return out
        ok = (data != nodata).all(axis=0)
        acc = np.zeros((nb, px, px), np.float32)
        wsum = np.zeros((px, px), np.float32)
        for i in (0, 1):
            for j in (0, 1):
                weight = wy[i][:, None] * wx[j][None, :] * ok[rows[i][:, None], cols[j][None, :]]
                acc += weight * data[:, rows[i][:, None], cols[j][None, :]]
                wsum += weight
        valid = inside & (wsum > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = acc / wsum
        out[:, ~valid] = np.nan
        return out

    def _warp(self, scene: SceneInfo, x_min: float, y_min: float, size: float) -> np.ndarray | None:
        """(bands, px, px) float32 of one scene on the tile's chip grid, NaN where it has no data."""
        src = self._open(scene)
        px = self.px
        t = src.transform
        same_crs = src.crs == self.dst_crs and t.b == 0 and t.d == 0 and t.e < 0
        if same_crs and scene.nodata is None:
            # the common case (NAIP in the region's UTM zone): one RasterIO call reads the tile's
            # exact (fractional) window resampled bilinearly to px x px, from the best overview
            win = from_bounds(x_min, y_min, x_min + size, y_min + size, transform=t)
            eps = 1e-6
            if win.col_off >= -eps and win.row_off >= -eps and win.col_off + win.width <= src.width + eps \
                    and win.row_off + win.height <= src.height + eps:
                bands = list(range(1, min(src.count, 4) + 1))
                try:
                    data = src.read(bands, window=win, out_shape=(len(bands), px, px), resampling=Resampling.bilinear)
                except (RasterioIOError, RasterioError) as exc:
                    raise GeojepaError(f"scene {scene.path}: cannot read pixels ({str(exc).splitlines()[0]}); the file is damaged, re-download it") from None
                return data  # source dtype; every pixel valid
        step = self._overview_step(src, size / px) if same_crs else 1
        window = self._window(src, x_min, y_min, size, step)
        if window is None:
            return None
        data = self._read(scene, src, window, step)
        if same_crs:
            wt = src.window_transform(window)
            return self._warp_same_crs(data, wt.c, wt.f, abs(t.a) * step, scene.nodata, x_min, y_min, size)
        warped = np.full((data.shape[0], px, px), np.nan, np.float32)
        reproject(
            data, warped, src_transform=src.window_transform(window), src_crs=src.crs, src_nodata=scene.nodata,
            dst_transform=tile_transform(x_min, y_min, size, px), dst_crs=self.dst_crs, dst_nodata=np.nan,
            resampling=Resampling.bilinear, init_dest_nodata=True,
        )
        return warped

    def chip(self, x_min_m: float, y_min_m: float, tile_size_m: float) -> Chip:
        """The chip of the tile with lower-left corner (x_min_m, y_min_m) in the tile CRS."""
        px = self.px
        out = np.zeros((4, px, px), np.float32)
        filled = np.zeros((px, px), bool)
        used: list[str] = []
        has_nir = True
        for i in self.scenes_over(x_min_m, y_min_m, tile_size_m):
            scene = self.scenes[i]
            warped = self._warp(scene, x_min_m, y_min_m, tile_size_m)
            if warped is None:
                continue
            nb = warped.shape[0]
            if not used and nb == 4 and warped.dtype == np.uint8 and scene.rescale is None:
                # one uint8 scene covers the whole tile (the common case): no mosaic needed
                return Chip(np.ascontiguousarray(warped.transpose(1, 2, 0)), 1.0, [scene.scene_id], True)
            warped = warped.astype(np.float32, copy=False)
            valid = ~np.isnan(warped).any(axis=0)
            if scene.rescale is not None:
                for b in range(nb):
                    lo, hi = scene.rescale[b]
                    warped[b] = (warped[b] - lo) * (255.0 / (hi - lo))
            if not used and nb == 4 and valid.all():  # the common case: one scene covers the tile
                out, filled = warped, valid
                used.append(scene.scene_id)
                break
            take = valid & ~filled
            if not take.any():
                continue
            out[:nb, take] = warped[:, take]
            filled |= take
            used.append(scene.scene_id)
            has_nir = has_nir and nb >= 4
            if filled.all():
                break
        np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        image = out.astype(np.uint8).transpose(1, 2, 0)
        if not used:
            has_nir = False
        return Chip(np.ascontiguousarray(image), float(filled.mean()), used, has_nir)
