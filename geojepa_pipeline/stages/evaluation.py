"""An evaluation report without Dagster: evaluate the current checkpoint of a variant, write HTML + JSON.

Reads, from the store, exactly the data versions the checkpoint was trained on (its inputs),
plus the current versions of any held-out regions, hands them to ``evaluate.run`` as arrays,
and writes ``reports/<variant>/<data_version>/``: ``metrics.json`` (DESIGN's shape plus
``mae_std``, ``skipped``, ``seeds``, ``protocol`` and ``transfer``), ``report.html``
(self-contained: tables, protocol, kNN, curves, a 2-D map, the split, a query tile beside its
5 nearest neighbours) and ``embeddings.parquet`` (tile id, region, building-masked embedding)
for ``geojepa knn``. The files and the metrics are also logged to the checkpoint's MLflow run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..columns import fixed_list_to_numpy, matrix_to_numpy, numpy_to_fixed_list
from ..errors import GeojepaError
from ..settings import Settings
from ..store import (
    CHECKPOINTS, EMBEDDINGS_FILE, GEOMETRY, GLOBAL_SCOPE, IMAGES, METRICS_FILE, RELATION_MEMBERS_FILE, REPORT_FILE, REPORTS,
    SCENES, TAGS, TILES, TOKENS, TRAIN_STATE_FILE, WEIGHTS_FILE, Dataset, Store, aligned_shards, missing,
)

REPORT_SCHEMA_VERSION = 2


@dataclass
class ReportOptions:
    """How evaluation_report scores a checkpoint (the asset's config, beside ``geo.splits.Holdout``)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # probes and zero-label subsampling repeated per seed (mean ± std)


def load_checkpoint_model(ck: Dataset):
    from safetensors.torch import load_file

    from ..model.config import ModelConfig
    from ..model.geojepa import GeoJEPA

    state = json.loads(ck.file(TRAIN_STATE_FILE).read_text())
    model = GeoJEPA(ModelConfig(**state["model_config"]))
    model.load_state_dict(load_file(str(ck.verified_file(WEIGHTS_FILE))))
    return model.eval(), state


def untrained_model(state: dict):
    """The control: the checkpoint's architecture with the weights training started from (same seed), eval mode."""
    import torch

    from ..model.config import ModelConfig
    from ..model.geojepa import GeoJEPA

    torch.manual_seed(state["train_config"]["seed"])  # as train() does before building the model
    return GeoJEPA(ModelConfig(**state["model_config"])).eval()


# ---- reading the regions -------------------------------------------------------------------
def imagery_kind(store: Store, region: str, images_version: str | None) -> str:
    """synthetic | files | stac | none: where the chips of ``images_version`` came from."""
    if not images_version or images_version not in store.versions(IMAGES, region):
        return "none"
    scenes = store.dataset(IMAGES, region, images_version).manifest["inputs"].get("naip_scenes")
    if not scenes or scenes not in store.versions(SCENES, region):
        return "none"
    source = store.dataset(SCENES, region, scenes).manifest.get("source", "none")
    return source if source in ("synthetic", "stac", "none") else "files"


def load_region_data(store: Store, region: str, tiles_version: str, tokens_version: str,
                     images_version: str | None = None, with_chips: bool = False):
    """``evaluate.run.RegionData`` of one region at the given data versions (shard order, every piece)."""
    from ..evaluate.labels import Pieces
    from ..evaluate.run import RegionData

    tiles, toks = store.dataset(TILES, region, tiles_version), store.dataset(TOKENS, region, tokens_version)
    ids, tx, ty, tile_of, types, osm_ids, tags, geom, pos = [], [], [], [], [], [], [], [], []
    offset = 0
    for tiles_path, entities_path, tokens_path in aligned_shards((tiles, "tiles"), (tiles, "entities"), (toks, "tokens")):
        t = pq.read_table(tiles_path, columns=["tile_id", "tile_x", "tile_y", "n_entities"])
        e = pq.read_table(entities_path, columns=["osm_type", "osm_id", "tags"])
        k = pq.read_table(tokens_path, columns=["geometry_token", "position"])
        ids += t.column("tile_id").to_pylist()
        tx.append(t.column("tile_x").to_numpy())
        ty.append(t.column("tile_y").to_numpy())
        tile_of.append(offset + np.repeat(np.arange(t.num_rows), t.column("n_entities").to_numpy()))
        offset += t.num_rows
        types.append(e.column("osm_type").to_numpy(zero_copy_only=False))
        osm_ids.append(e.column("osm_id").to_numpy())
        tags.append(e.column("tags"))
        geom.append(matrix_to_numpy(k.column("geometry_token"), np.float32))
        pos.append(fixed_list_to_numpy(k.column("position")))
    # tile_shards before code version 2 wrote no relation members
    members = pq.read_table(tiles.file(RELATION_MEMBERS_FILE)) if tiles.has_file(RELATION_MEMBERS_FILE) else None
    all_tags = pa.chunked_array([c for t in tags for c in t.chunks], pa.map_(pa.string(), pa.string()))
    pieces = Pieces.build(np.concatenate(tile_of), np.concatenate(types), np.concatenate(osm_ids), all_tags, offset)
    kind = imagery_kind(store, region, images_version)
    chips = None
    if with_chips:
        if images_version is None or images_version not in store.versions(IMAGES, region):
            raise missing(IMAGES, region)
        from .imagery import StoredChips, SyntheticChips

        images = store.dataset(IMAGES, region, images_version)
        chips = StoredChips(images, kind)
        if kind == "synthetic":
            chips = SyntheticChips(store, region, tiles, images, pieces, chips)
    return RegionData(region, int(tiles.manifest["epsg"]), ids, np.concatenate(tx), np.concatenate(ty), pieces,
                      np.concatenate(geom), np.concatenate(pos), members, kind, chips)


def evaluation_regions(store: Store, ck: Dataset, holdout: list[str], with_chips: bool, log: Callable[[str], None]):
    """(pretraining regions, held-out regions) as ``RegionData``: the checkpoint's own input versions, and the current
    versions of the held-out regions, which must be unseen by pretraining and tokenized with the same encoders."""
    inputs, trained = ck.manifest["inputs"], ck.manifest["regions"]
    overlap = sorted(set(holdout) & set(trained))
    if overlap:
        raise GeojepaError(f"held-out region(s) {', '.join(overlap)} were in pretraining of this checkpoint; "
                           f"train without them first: geojepa materialize --holdout {' --holdout '.join(overlap)}")
    geom = store.dataset(GEOMETRY, GLOBAL_SCOPE, inputs["geometry_encoder"])
    seen = sorted(set(holdout) & set(geom.manifest.get("regions", [])))
    if seen:
        raise GeojepaError(f"the geometry encoder this checkpoint uses was pretrained on held-out region(s) {', '.join(seen)}; "
                           f"materialize again with --holdout {' --holdout '.join(seen)} (it leaves them out of every pretraining)")
    regions = []
    for name in trained:
        log(f"evaluation: reading {name} (the versions the checkpoint was trained on)")
        regions.append(load_region_data(store, name, inputs[f"tile_shards/{name}"], inputs[f"tile_tokens/{name}"],
                                        inputs.get(f"tile_images/{name}"), with_chips))
    held = []
    for name in holdout:
        tok, tiles = store.require(TOKENS, name), store.require(TILES, name)
        if tok.manifest["inputs"]["tile_shards"] != tiles.data_version or tok.manifest["inputs"]["geometry_encoder"] != inputs["geometry_encoder"]:
            raise GeojepaError(f"tile_tokens[{name}] was not built from its current tile_shards with this checkpoint's geometry "
                               f"encoder; re-materialize tile_tokens[{name}]")
        images = store.current(IMAGES, name)
        log(f"evaluation: reading held-out region {name}")
        held.append(load_region_data(store, name, tiles.data_version, tok.data_version,
                                     images.data_version if images is not None else None, with_chips))
    return regions, held


# ---- pictures that read the store ----------------------------------------------------------
def _tile_picture(store: Store, region: str, tile_id: str, px: int = 112) -> bytes:
    """PNG: the tile's entities rendered (class colours) beside its chip when it has one."""
    import shapely
    from PIL import Image

    from ..geo.synthetic import class_preview_rgb, classify, paint_geometries, rasterize_classes

    from .imagery import decode_chip

    tiles = store.require(TILES, region)
    images = store.current(IMAGES, region)
    panels = []
    # the chips of the current tile_images when they were cut from these tile shards
    images = images if images is not None and images.manifest["inputs"]["tile_shards"] == tiles.data_version else None
    for shard, (entities_path, images_path) in zip(tiles.shard_entries, aligned_shards((tiles, "entities"), (images, "images"))):
        if not (shard["first_tile"] <= tile_id <= shard["last_tile"]):
            continue
        ents = pq.read_table(entities_path, columns=["tile_id", "osm_id", "tags", "geometry"],
                             filters=[("tile_id", "=", tile_id)])
        if not ents.num_rows:
            continue
        classes, widths = classify(ents.column("tags"), ents.column("osm_id").to_numpy())
        shapes, values = paint_geometries(shapely.from_wkb(ents.column("geometry").to_numpy(zero_copy_only=False)), classes, widths)
        size = float(tiles.manifest["tile_size_m"])
        panels.append(class_preview_rgb(rasterize_classes(shapes, values, 0.0, size, 224, 224, size / 224)))
        if images is not None:
            img = pq.read_table(images_path, columns=["tile_id", "image"], filters=[("tile_id", "=", tile_id)])
            if img.num_rows and img.column("image")[0].is_valid:
                panels.append(decode_chip(img.column("image")[0].as_py())[..., :3])
        break
    if not panels:
        panels = [np.full((224, 224, 3), 255, np.uint8)]
    canvas = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0)), constant_values=255) for p in panels], axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas).resize((canvas.shape[1] * px // 224, px), Image.BILINEAR).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def neighbours_html(store: Store, query: tuple[str, str], neighbours: list[tuple[str, str, float]]) -> str:
    def img(region, tid):
        return f'<img src="data:image/png;base64,{base64.b64encode(_tile_picture(store, region, tid)).decode()}">'

    neigh = "".join(f"<figure>{img(r, t)}<figcaption>{html.escape(t)} ({html.escape(r)}) cos {s:.3f}</figcaption></figure>"
                    for r, t, s in neighbours)
    return f"<figure>{img(*query)}<figcaption>query {html.escape(query[1])} ({html.escape(query[0])})</figcaption></figure><hr>{neigh}"


@dataclass
class ReportResult:
    dataset: Dataset
    metrics: dict
    table_md: str
    run_id: str | None
    pictures: dict
    transfer_md: str | None = None


def report_pictures(ev, ck: Dataset) -> dict[str, bytes]:
    """The report's PNGs: training curves, the PaCMAP map coloured by building count, each region's split."""
    from ..evaluate.report import project_2d, scatter_png, split_map_png, training_curves

    state = json.loads(ck.file(TRAIN_STATE_FILE).read_text())
    pictures = training_curves(state.get("epochs", []), state.get("losses", []))
    f = ev.features["building_count"]
    xy, rows = project_2d(f.embeddings["geojepa"])
    pictures["map"] = scatter_png(xy, f.labels[rows], f"{len(rows)} tiles, coloured by building_count (log scale)")
    regions = np.asarray(ev.tile_regions, object)
    for name in dict.fromkeys(ev.tile_regions):
        m = regions == name
        pictures[f"split_map/{name}"] = split_map_png(ev.tile_xy[m, 0], ev.tile_xy[m, 1], ev.tile_split[m], name)
    return pictures


def build_report(variant: str, store: Store, settings: Settings, seeds=(0, 1, 2), holdout_regions: list[str] | tuple = (),
                 log: Callable[[str], None] = print) -> ReportResult:
    """Evaluate the current checkpoint of ``variant``; commit ``reports/<variant>/<dv>``; log it to MLflow."""
    from ..evaluate.knn import cosine_knn
    from ..evaluate.report import render_html
    from ..evaluate.run import evaluate, metrics_table_markdown
    from .tokens import load_vocabulary

    ck = store.require(CHECKPOINTS, variant)
    model, state = load_checkpoint_model(ck)
    vocab = load_vocabulary(store.dataset(TAGS, GLOBAL_SCOPE, ck.manifest["inputs"]["tag_embeddings"]))
    from ..train.tracking import registered_version, tracking_uri

    uri = tracking_uri(settings.mlflow_dir)
    version = registered_version(uri, variant, ck.data_version)
    model_version = f"geojepa-{variant}:{version.version}" if version is not None else f"geojepa-{variant}@{ck.data_version}"
    uses_images = model.cfg.uses.images
    regions, held = evaluation_regions(store, ck, sorted(holdout_regions), uses_images, log)
    ev = evaluate({"geojepa": model, "random_init": untrained_model(state)}, vocab, regions, variant, model_version, held,
                  seeds=seeds, split_seed=state["train_config"].get("split_seed", 0), uses_images=uses_images, log=log)
    table = metrics_table_markdown(ev.metrics)
    transfer = metrics_table_markdown(ev.metrics, "transfer") if held else None
    pictures = report_pictures(ev, ck)
    # the query shown: the tile with the most entity pieces (a busy place is the telling example)
    emb = ev.embeddings
    nn = cosine_knn(emb, 5)
    q = int(np.argmax(ev.tile_pieces))
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    neighbours = [(ev.tile_regions[j], ev.tile_ids[j], float(e[q] @ e[j])) for j in nn[q]]
    tables = {"tasks": table, **({"transfer": transfer} if transfer else {})}
    page = render_html(ev.metrics, tables, pictures, neighbours_html(store, (ev.tile_regions[q], ev.tile_ids[q]), neighbours))
    with store.writing(REPORTS, variant) as staging:
        staging.file(METRICS_FILE).write_text(json.dumps(ev.metrics, indent=1, sort_keys=True) + "\n")
        staging.file(REPORT_FILE).write_text(page)
        pq.write_table(pa.table({"tile_id": ev.tile_ids, "region": ev.tile_regions,
                                 "embedding": numpy_to_fixed_list(emb.astype(np.float32), pa.float32())}),
                       staging.file(EMBEDDINGS_FILE), compression="zstd")
        staging.manifest = {"schema_version": REPORT_SCHEMA_VERSION, "variant": variant, "checkpoint": ck.data_version,
                            "model_version": model_version, "regions": ck.manifest["regions"], "holdout_regions": sorted(holdout_regions),
                            "inputs": {"checkpoint": ck.data_version, "holdout_regions": sorted(holdout_regions)}}
    dataset = staging.dataset
    run_id = version.run_id if version is not None else None
    if run_id is not None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.log_artifact(run_id, str(dataset.file(METRICS_FILE)), artifact_path="evaluation")
        client.log_artifact(run_id, str(dataset.file(REPORT_FILE)), artifact_path="evaluation")
        metrics = [Metric(f"eval/{t}/{m}", v["mae"], 0, 0) for t, res in ev.metrics["tasks"].items() for m, v in res.items()]
        metrics += [Metric(f"eval/transfer/{t}/{m}", v["mae"], 0, 0) for t, res in ev.metrics["transfer"].items() for m, v in res.items()]
        metrics += [Metric(f"eval/knn/{t}", v["ratio"], 0, 0) for t, v in ev.metrics["knn"].items() if v["ratio"] == v["ratio"]]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
    log(f"evaluation report: {dataset.file(REPORT_FILE)}")
    return ReportResult(dataset, ev.metrics, table, run_id, pictures, transfer)
