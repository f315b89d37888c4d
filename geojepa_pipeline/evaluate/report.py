"""The evaluation report a person reads: tables, protocol, curves, kNN, a 2-D map of the embeddings, the split.

Pure (Pillow, PaCMAP): takes metrics and arrays, returns PNG bytes and one self-contained HTML page.

The 2-D map is PaCMAP. Measured on 3,140 Liechtenstein tile embeddings (128-d, tiny GT) on 2
cores: PaCMAP 8.2 s, UMAP 27.3 s (54 s the first time, with numba's compile), keeping 39 % and
44 % of each tile's 10 nearest neighbours, trustworthiness 0.967 and 0.976. Near the same
picture at a third of the time, inside the demo's budget.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from ..geo.render import colormap, curve_png
from ..geo.splits import SPLIT_NAMES

MAP_MAX_POINTS = 5000  # tiles on the 2-D map (an even sample beyond this)
SPLIT_COLOURS = {0: (190, 190, 190), 1: (70, 130, 200), 2: (230, 120, 30), -1: (150, 60, 160)}  # train, val, test, held out


def project_2d(embeddings: np.ndarray, seed: int = 0, max_points: int = MAP_MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(xy (N, 2) float32, rows (N,) int64): a PaCMAP map of at most ``max_points`` rows of ``embeddings`` (M, D)."""
    rows = np.arange(len(embeddings))
    if len(rows) > max_points:
        rows = np.linspace(0, len(rows) - 1, max_points).round().astype(np.int64)
    x = np.asarray(embeddings[rows], np.float32)
    if len(x) < 10:
        return np.zeros((len(x), 2), np.float32), rows
    import logging

    import pacmap

    logging.getLogger("pacmap").setLevel(logging.ERROR)  # it warns that random_state is set: we set it on purpose

    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    reducer = pacmap.PaCMAP(n_components=2, n_neighbors=min(10, len(x) - 2), random_state=seed)
    return np.asarray(reducer.fit_transform(x), np.float32), rows


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def scatter_png(xy: np.ndarray, values: np.ndarray, title: str, size: int = 420) -> bytes:
    """Points ``xy`` (N, 2) coloured by ``values`` (N,) on a log(1 + v) viridis scale, with a legend."""
    img = Image.new("RGB", (size, size + 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title, fill=(0, 0, 0))
    if len(xy):
        lo, hi = xy.min(0), xy.max(0)
        p = (xy - lo) / np.maximum(hi - lo, 1e-9) * (size - 16) + 8
        v = np.log1p(np.maximum(values, 0).astype(np.float64))
        c = colormap(v / max(v.max(), 1e-9))
        for i in np.argsort(v, kind="stable"):  # high values on top
            x, y = p[i, 0], size + 16 - p[i, 1]
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=tuple(int(a) for a in c[i]))
        bar = colormap(np.linspace(0, 1, 80))[None].repeat(6, 0)
        img.paste(Image.fromarray(bar), (size - 150, 6))
        draw.text((size - 66, 2), f"0..{values.max():g}", fill=(0, 0, 0))
    return _png(img)


def split_map_png(tile_x: np.ndarray, tile_y: np.ndarray, split: np.ndarray, title: str, max_px: int = 360) -> bytes:
    """One region's tiles, north up, coloured by split: train grey, validation blue, test orange, held out purple."""
    if not len(tile_x):
        return _png(Image.new("RGB", (120, 40), (255, 255, 255)))
    x0, y0 = int(tile_x.min()), int(tile_y.min())
    w, h = int(tile_x.max()) - x0 + 1, int(tile_y.max()) - y0 + 1
    grid = np.full((h, w, 3), 255, np.uint8)
    for s, colour in SPLIT_COLOURS.items():
        m = split == s
        grid[(h - 1) - (tile_y[m] - y0), tile_x[m] - x0] = colour
    factor = max(1, min(max_px // max(w, h), 12))
    img = Image.fromarray(grid).resize((w * factor, h * factor), Image.NEAREST)
    if max(img.size) > max_px:
        s = max_px / max(img.size)
        img = img.resize((max(1, int(img.size[0] * s)), max(1, int(img.size[1] * s))), Image.NEAREST)
    canvas = Image.new("RGB", (max(img.size[0], 300), img.size[1] + 30), (255, 255, 255))
    canvas.paste(img, (0, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 0), title, fill=(0, 0, 0))
    x = 2
    for s, name in ((0, "train"), (1, "val"), (2, "test"), (-1, "held out")):
        if (split == s).any():
            draw.rectangle([x, 16, x + 8, 24], fill=SPLIT_COLOURS[s])
            draw.text((x + 11, 14), f"{name} {int((split == s).sum())}", fill=(0, 0, 0))
            x += 80
    return _png(canvas)


def training_curves(epochs: list[dict], losses: list[float]) -> dict[str, bytes]:
    """PNG curves of the checkpoint's training: loss per step (10-step mean) and the collapse monitors per epoch."""
    smooth = [float(np.mean(losses[max(0, i - 9):i + 1])) for i in range(len(losses))]
    out = {"loss": curve_png(smooth or [0.0], "training loss per step (10-step mean)")}
    for key, title in (("target_std_mean", "target std per dimension (mean), per epoch"), ("rankme", "RankMe (effective rank), per epoch"),
                       ("probe_building_r2", "validation probe R² (building count), per epoch")):
        values = [e[key] for e in epochs if key in e and e[key] == e[key]]
        if values:
            out[key] = curve_png(values, title)
    return out


def _img(png: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(markdown: str) -> str:
    rows = []
    for line in markdown.splitlines():
        if set(line.replace("|", "").strip()) <= {"-", " "}:
            continue
        cells = [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
        tag = "th" if not rows else "td"
        rows.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    return f"<table>{''.join(rows)}</table>"


def protocol_html(protocol: dict) -> str:
    """The protocol object as a short list a person reads, with the per-region masking counts in a table."""
    split = protocol["split"]
    tiles = ", ".join(f"{r}: " + "/".join(str(c[n]) for n in SPLIT_NAMES) for r, c in split["tiles"].items())
    corr = protocol.get("label_piece_correlation", {}).get("building_count", {})
    items = [
        f"<li><b>Masking: {html.escape(protocol['masking'])}</b>. Each task's input has the label's entities removed "
        f"(every piece, every modality) and its label tags stripped ({html.escape(protocol['masking_rules'])}).</li>",
        f"<li><b>Split</b>: {html.escape(split['method'])}, split seed {split['split_seed']}; pretraining read "
        f"{html.escape(split['pretraining'])}; the checkpoint was chosen on {html.escape(split['checkpoint_choice'])}; "
        f"probes {html.escape(split['probes'])}. Tiles train/val/test: {html.escape(tiles)}.</li>",
        "<li><b>Modalities</b>: " + html.escape("; ".join(f"{m}: {'+'.join(v) or 'none'}" for m, v in protocol["modalities"].items())) + "</li>",
        "<li><b>Imagery</b>: " + html.escape(", ".join(f"{r}: {k}" for r, k in protocol["imagery"].items())) + "</li>",
        f"<li><b>Pieces per tile</b>: all of them (max_pieces {json.dumps(protocol['max_pieces'])}).</li>",
        "<li><b>Held-out regions</b> (never seen by pretraining): " + html.escape(", ".join(protocol["holdout_regions"]) or "none") + "</li>",
    ]
    if corr:
        items.append(f"<li>building_count vs pieces per tile: r = {corr['unmasked_input']:.3f} on the unmasked input, "
                     f"{corr['masked_input']:.3f} on the masked one.</li>")
    head = "<tr><th>region</th><th>task</th><th>removed entities</th><th>+ untagged members</th><th>+ relation pieces</th>" \
           "<th>removed pieces</th><th>stripped tags</th><th>kept pieces</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{html.escape(t)}</td><td>{c['removed_entities']}</td><td>{c['removed_untagged_members']}</td>"
        f"<td>{c['removed_relation_pieces_holding_them']}</td><td>{c['removed_pieces']}</td><td>{c['stripped_tags_of_kept_pieces']}</td>"
        f"<td>{c['kept_pieces']}</td></tr>"
        for r, tasks in protocol["masked_input"].items() for t, c in tasks.items())
    return f"<ul>{''.join(items)}</ul><details><summary>what the masking removed</summary><table>{head}{body}</table></details>"


def knn_html(knn: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{v['ratio']:.3f}</td><td>{v.get('random_init_ratio', float('nan')):.3f}</td><td>{v['n']}</td></tr>"
        for t, v in knn.items())
    return ("<p>Numeric labels: mean |difference| to the k = 5 nearest tiles (cosine) over that to random tiles "
            "(below 1 beats chance). Categorical: agreement rate over that of random tiles (above 1 beats chance). "
            "Each label with its own task-masked embeddings.</p>"
            f"<table><tr><th>label</th><th>GeoJEPA</th><th>untrained</th><th>tiles</th></tr>{rows}</table>")


def render_html(metrics: dict, tables: dict[str, str], pictures: dict[str, bytes], neighbours_html: str) -> str:
    """A self-contained page (inline PNGs): tables, protocol, kNN, curves, the 2-D map, the split, a query tile."""
    title = f"GeoJEPA-{metrics['variant']} — {metrics['model_version']}"
    curves = "".join(_img(pictures[k], k) for k in ("loss", "target_std_mean", "rankme", "probe_building_r2") if k in pictures)
    maps = "".join(_img(v, k) for k, v in pictures.items() if k.startswith("split_map/"))
    transfer = ""
    if "transfer" in tables:
        transfer = (f"<h2>Transfer: tested on {html.escape(', '.join(metrics['protocol']['holdout_regions']))}</h2>"
                    "<p>Probes fit on the pretraining regions' train tiles, tested on every tile of the held-out regions.</p>"
                    + _table(tables["transfer"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)} evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;margin:6px 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px}} figure{{display:inline-block;margin:4px}} figcaption{{font-size:11px}}
img{{margin:4px;vertical-align:top}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Pretraining regions: {html.escape(', '.join(metrics['regions']))}. Test MAE (error rate for bridge and car_bridge),
mean ± std over seeds {metrics['seeds']}. Lower is better; compare each GeoJEPA row with its untrained twin (random_init).</p>
<h2>In-region test tiles</h2>{_table(tables['tasks'])}
{transfer}
<h2>Protocol</h2>{protocol_html(metrics['protocol'])}
<h2>kNN</h2>{knn_html(metrics['knn'])}
<h2>Training</h2>{curves}
<h2>Tile embeddings in 2-D (PaCMAP, building-masked input)</h2>{_img(pictures['map'], 'map') if 'map' in pictures else ''}
<h2>The split</h2>{maps}
<h2>A query tile and its 5 nearest neighbours</h2><p>Each: its entities rendered (left) and its image chip (right) when it has one.</p>
{neighbours_html}</body></html>
"""
