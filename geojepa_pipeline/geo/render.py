"""Small pictures for metadata and reports (Pillow only, no matplotlib)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

# 8 anchors of the viridis colormap, interpolated linearly.
_VIRIDIS = np.array([
    [68, 1, 84], [70, 50, 127], [54, 92, 141], [39, 127, 142],
    [31, 161, 135], [74, 194, 109], [159, 218, 58], [253, 231, 37],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to (…, 3) uint8 viridis colours."""
    v = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    frac = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[hi] * frac).astype(np.uint8)


def tile_density_png(tile_x: np.ndarray, tile_y: np.ndarray, counts: np.ndarray, max_px: int = 480, title: str = "") -> bytes:
    """A map of entities per tile: one square per 300 m tile, log colour scale, north up.

    Args:
        tile_x, tile_y: (T,) grid indices of the non-empty tiles.
        counts: (T,) entities (pieces) per tile.
    """
    if len(tile_x) == 0:
        return tile_map_png(tile_x, tile_y, np.zeros((0, 3), np.uint8), "", max_px)
    logc = np.log1p(counts.astype(np.float64))
    bar = colormap(np.linspace(0, 1, 100))
    return tile_map_png(tile_x, tile_y, colormap(logc / max(logc.max(), 1e-9)), f"1 .. {int(counts.max())} per tile (log)  {title}",
                        max_px, bar)


def tile_map_png(tile_x: np.ndarray, tile_y: np.ndarray, colours: np.ndarray, label: str, max_px: int = 480,
                 bar: np.ndarray | None = None) -> bytes:
    """A map of tiles, each one square of its colour, north up, white where no tile is, with a one-line legend.

    Args:
        tile_x, tile_y: (T,) grid indices.
        colours: (T, 3) uint8 RGB of each tile.
        bar: (100, 3) uint8 colour bar drawn before the label (None: no bar).
    """
    if len(tile_x) == 0:
        img = Image.new("RGB", (200, 60), (255, 255, 255))
        ImageDraw.Draw(img).text((10, 20), "no tiles", fill=(0, 0, 0))
    else:
        tile_x, tile_y = np.asarray(tile_x, np.int64), np.asarray(tile_y, np.int64)
        x0, y0 = int(tile_x.min()), int(tile_y.min())
        w, h = int(tile_x.max()) - x0 + 1, int(tile_y.max()) - y0 + 1
        grid = np.full((h, w, 3), 255, np.uint8)
        grid[(h - 1) - (tile_y - y0), tile_x - x0] = colours  # north up
        factor = max(1, min(max_px // max(w, h), 8))
        img = Image.fromarray(grid).resize((w * factor, h * factor), Image.NEAREST)
        if max(img.size) > max_px:
            s = max_px / max(img.size)
            img = img.resize((max(1, int(img.size[0] * s)), max(1, int(img.size[1] * s))), Image.BOX)
        legend_h = 22
        text_x = 110 if bar is not None else 4
        text_w = int(ImageDraw.Draw(img).textlength(label)) + text_x + 10
        canvas = Image.new("RGB", (max(img.size[0], text_w), img.size[1] + legend_h), (255, 255, 255))
        canvas.paste(img, (0, legend_h))
        draw = ImageDraw.Draw(canvas)
        if bar is not None:
            canvas.paste(Image.fromarray(np.asarray(bar, np.uint8)[None, :, :].repeat(8, axis=0)), (4, 4))
        draw.text((text_x, 2), label, fill=(0, 0, 0))
        img = canvas
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown with the PNG inline (a data URI), as the Dagster UI renders it."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def chip_preview_png(rows: list[tuple[np.ndarray, np.ndarray, str]], panel_px: int = 160) -> bytes:
    """Chips next to the OSM entities they should show: one row per tile.

    Args:
        rows: (chip (H, W, 4) uint8 R G B NIR, osm_map (h, w, 3) uint8, label) per tile.
        panel_px: side of each panel in the picture.
    Columns: the chip's RGB, its NIR as grey, the rendered OSM entities. Quantised to 256
    colours so the inline PNG stays small.
    """
    label_h, gap = 14, 4
    cols = 3
    width = cols * panel_px + (cols + 1) * gap
    height = max(1, len(rows)) * (panel_px + label_h + gap) + gap + label_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("chip RGB", "chip NIR", "OSM entities")):
        draw.text((gap + c * (panel_px + gap), 1), title, fill=(0, 0, 0))
    for r, (chip, osm_map, label) in enumerate(rows):
        y = label_h + gap + r * (panel_px + label_h + gap)
        panels = [chip[..., :3], np.repeat(chip[..., 3:4], 3, axis=2), osm_map]
        for c, panel in enumerate(panels):
            img = Image.fromarray(np.ascontiguousarray(panel)).resize((panel_px, panel_px), Image.BILINEAR)
            canvas.paste(img, (gap + c * (panel_px + gap), y))
        draw.text((gap, y + panel_px + 1), label, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.quantize(256).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def curve_png(values: list[float], title: str, reference: float | None = None, width: int = 420, height: int = 180) -> bytes:
    """A line plot of ``values`` (e.g. a loss per step), with an optional dashed reference level."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 46, width - 10, 20, height - 22
    v = np.asarray(values, np.float64)
    lo = float(min(v.min(), reference if reference is not None else v.min())) if v.size else 0.0
    hi = float(max(v.max(), reference if reference is not None else v.max())) if v.size else 1.0
    hi = hi if hi > lo else lo + 1.0
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((left, 4), title, fill=(0, 0, 0))
    draw.text((4, top - 4), f"{hi:.2f}", fill=(80, 80, 80))
    draw.text((4, bottom - 8), f"{lo:.2f}", fill=(80, 80, 80))
    draw.text((left, bottom + 6), "0", fill=(80, 80, 80))
    draw.text((right - 30, bottom + 6), f"{len(v)}", fill=(80, 80, 80))
    y_of = lambda y: bottom - (y - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    if reference is not None:
        y = y_of(reference)
        for x in range(left, right, 8):
            draw.line([(x, y), (min(x + 4, right), y)], fill=(200, 80, 80))
    if v.size > 1:
        xs = left + np.arange(v.size) / (v.size - 1) * (right - left)
        draw.line(list(zip(xs.tolist(), [y_of(y) for y in v])), fill=(40, 90, 170), width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
