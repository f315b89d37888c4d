"""An evaluation report without Dagster: evaluate the current checkpoint of a variant, write HTML + JSON.

``reports/<variant>/<data_version>/`` holds ``metrics.json`` (DESIGN's shape plus ``mae_std``,
``skipped``, ``seeds``), ``report.html`` (self-contained: metric tables and a query tile
beside its 5 nearest neighbours, each rendered from its entities and shown with its chip)
and ``embeddings.parquet`` (tile id, region, building-masked embedding) for ``geojepa knn``.
Both files are also logged to the checkpoint's MLflow run, with the metrics.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .columns import numpy_to_fixed_list
from .errors import GeojepaError
from .settings import Settings
from .store import GLOBAL_SCOPE, Dataset, Store

REPORT_KIND = "reports"
REPORT_SCHEMA_VERSION = 1


def load_checkpoint_model(ck: Dataset):
    from safetensors.torch import load_file

    from .model.config import ModelConfig
    from .model.geojepa import GeoJEPA

    state = json.loads((ck.path / "train_state.json").read_text())
    model = GeoJEPA(ModelConfig(**state["model_config"]))
    model.load_state_dict(load_file(str(ck.path / "model.safetensors")))
    return model.eval(), state


def _mlflow_version(settings: Settings, variant: str, data_version: str):
    from mlflow.tracking import MlflowClient

    from .train.tracking import tracking_uri

    client = MlflowClient(tracking_uri(settings.mlflow_dir))
    try:
        versions = client.search_model_versions(f"name='geojepa-{variant}'")
    except Exception:
        return client, None
    match = [v for v in versions if v.tags.get("geojepa.data_version") == data_version]
    return client, (max(match, key=lambda v: int(v.version)) if match else None)


def _tile_picture(store: Store, region: str, tile_id: str, px: int = 112) -> bytes:
    """PNG: the tile's entities rendered (class colours) beside its chip when it has one."""
    import shapely
    from PIL import Image

    from .geo.synthetic import (
        class_preview_rgb,
        classify,
        paint_geometries,
        rasterize_classes,
    )

    tiles = store.current("tiles", region)
    panels = []
    for shard in tiles.manifest["shards"]:
        if not (shard["first_tile"] <= tile_id <= shard["last_tile"]):
            continue
        ents = pq.read_table(tiles.path / shard["entities_file"], columns=["tile_id", "osm_id", "tags", "geometry"],
                             filters=[("tile_id", "=", tile_id)])
        if not ents.num_rows:
            continue
        classes, widths = classify(ents.column("tags"), ents.column("osm_id").to_numpy())
        shapes, values = paint_geometries(shapely.from_wkb(ents.column("geometry").to_numpy(zero_copy_only=False)), classes, widths)
        size = float(tiles.manifest["tile_size_m"])
        panels.append(class_preview_rgb(rasterize_classes(shapes, values, 0.0, size, 224, 224, size / 224)))
        images = store.current("images", region)
        if images is not None:
            img = pq.read_table(images.path / images.manifest["shards"][shard["index"]]["images_file"],
                                columns=["tile_id", "image"], filters=[("tile_id", "=", tile_id)])
            if img.num_rows and img.column("image")[0].is_valid:
                panels.append(np.frombuffer(img.column("image")[0].as_py(), np.uint8).reshape(224, 224, 4)[..., :3])
        break
    if not panels:
        panels = [np.full((224, 224, 3), 255, np.uint8)]
    canvas = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0)), constant_values=255) for p in panels], axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas).resize((canvas.shape[1] * px // 224, px), Image.BILINEAR).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def render_html(metrics: dict, table_md: str, store: Store, query: tuple[str, str], neighbours: list[tuple[str, str, float]]) -> str:
    """A self-contained page: tables and a query tile beside its neighbours (inline PNGs)."""
    def img(region, tid):
        return f'<img src="data:image/png;base64,{base64.b64encode(_tile_picture(store, region, tid)).decode()}">'

    rows = []
    for line in table_md.splitlines():
        if set(line.replace("|", "").strip()) <= {"-", " "}:
            continue
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        tag = "th" if not rows else "td"
        rows.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    knn_rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{v['ratio']:.3f}</td><td>{json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in v.items() if k != 'ratio'})}</td></tr>"
        for t, v in metrics["knn"].items())
    neigh = "".join(f"<figure>{img(r, t)}<figcaption>{html.escape(t)} ({html.escape(r)}) cos {s:.3f}</figcaption></figure>"
                    for r, t, s in neighbours)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>GeoJEPA-{html.escape(metrics['variant'])} evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:4px}} figcaption{{font-size:11px}}</style></head><body>
<h1>GeoJEPA-{html.escape(metrics['variant'])} — {html.escape(str(metrics['model_version']))}</h1>
<p>Regions: {html.escape(', '.join(metrics['regions']))}. Masked protocol (label-bearing tags removed per task), spatial split
{html.escape(metrics['split'])}, seeds {metrics['seeds']}. Test MAE (error rate for bridge / car_bridge), mean ± std.</p>
<table>{''.join(rows)}</table>
<h2>kNN (k = 5, cosine), against random tiles</h2><p>Numeric labels: ratio of mean |difference| (below 1 is better than chance).
Categorical: ratio of agreement rates (above 1 is better).</p>
<table><tr><th>label</th><th>ratio</th><th>details</th></tr>{knn_rows}</table>
<h2>A query tile and its 5 nearest neighbours</h2><p>Each: its entities rendered (left) and its image chip (right) when it has one.</p>
<figure>{img(*query)}<figcaption>query {html.escape(query[1])} ({html.escape(query[0])})</figcaption></figure>
<hr>{neigh}</body></html>
"""


@dataclass
class ReportResult:
    dataset: Dataset
    metrics: dict
    table_md: str
    run_id: str | None


def build_report(variant: str, store: Store, settings: Settings, seeds=(0, 1, 2), log: Callable[[str], None] = print) -> ReportResult:
    """Evaluate the current checkpoint of ``variant``; commit ``reports/<variant>/<dv>``; log it to MLflow."""
    from .evaluate.knn import cosine_knn
    from .evaluate.run import evaluate, metrics_table_markdown
    from .tokens import TAG_KIND, load_vocabulary

    ck = store.current("checkpoints", variant)
    if ck is None:
        raise GeojepaError(f"no geojepa_checkpoint[{variant}] yet; materialize it first (geojepa materialize --select geojepa_checkpoint --variant {variant})")
    model, state = load_checkpoint_model(ck)
    vocab = load_vocabulary(store.dataset(TAG_KIND, GLOBAL_SCOPE, ck.manifest["inputs"]["tag_embeddings"]))
    client, version = _mlflow_version(settings, variant, ck.data_version)
    model_version = f"geojepa-{variant}:{version.version}" if version is not None else f"geojepa-{variant}@{ck.data_version}"
    ev = evaluate(model, vocab, store, ck.manifest["regions"], variant, model_version, seeds=seeds,
                  max_tokens=state["train_config"]["max_tokens"], split_seed=state["train_config"].get("split_seed", 0), log=log)
    table = metrics_table_markdown(ev.metrics)
    # the query shown: the tile with the most entity pieces (a busy place is the telling example)
    emb = ev.embeddings
    nn = cosine_knn(emb, 5)
    q = int(np.argmax(ev.tile_pieces))
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    neighbours = [(ev.tile_regions[j], ev.tile_ids[j], float(e[q] @ e[j])) for j in nn[q]]
    page = render_html(ev.metrics, table, store, (ev.tile_regions[q], ev.tile_ids[q]), neighbours)
    staging = store.new_staging_dir(REPORT_KIND, variant)
    try:
        (staging / "metrics.json").write_text(json.dumps(ev.metrics, indent=1, sort_keys=True) + "\n")
        (staging / "report.html").write_text(page)
        pq.write_table(pa.table({"tile_id": ev.tile_ids, "region": ev.tile_regions,
                                 "embedding": numpy_to_fixed_list(emb.astype(np.float32), pa.float32())}),
                       staging / "embeddings.parquet", compression="zstd")
        manifest = {"schema_version": REPORT_SCHEMA_VERSION, "variant": variant, "checkpoint": ck.data_version,
                    "model_version": model_version, "regions": ck.manifest["regions"]}
        dataset = store.commit(REPORT_KIND, variant, staging, manifest)
    except BaseException:
        store.discard_staging(staging)
        raise
    store.set_current(REPORT_KIND, variant, dataset.data_version)
    run_id = version.run_id if version is not None else None
    if run_id is not None:
        from mlflow.entities import Metric

        client.log_artifact(run_id, str(dataset.path / "metrics.json"), artifact_path="evaluation")
        client.log_artifact(run_id, str(dataset.path / "report.html"), artifact_path="evaluation")
        metrics = [Metric(f"eval/{t}/{m}", v["mae"], 0, 0) for t, res in ev.metrics["tasks"].items() for m, v in res.items()]
        metrics += [Metric(f"eval/knn/{t}", v["ratio"], 0, 0) for t, v in ev.metrics["knn"].items() if v["ratio"] == v["ratio"]]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
    log(f"evaluation report: {dataset.path / 'report.html'}")
    return ReportResult(dataset, ev.metrics, table, run_id)
