"""Evaluate a checkpoint: masked-protocol embeddings, probes and baselines on spatial splits, measured kNN.

For each task the tiles are re-tokenized with that task's label-bearing tags removed (the tag
tokens are rebuilt from the remaining tags with the same vocabulary), embedded with the
target encoder (concat(mean, max) over valid tokens), and probed. Baselines use the same
masked tags and the same splits: ``dummy`` (train median), ``tagpool_mlp`` (mean of the
pieces' masked tag tokens) and ``tagcount_mlp`` (counts of the 512 most frequent pairs).
Splits are by 4 x 4-tile blocks: 70 % train, 15 % validation, 15 % test. A task with fewer
than 30 positive test tiles is skipped and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..columns import fixed_list_to_numpy
from ..geo.splits import tile_split
from ..store import Store
from .knn import agreement_ratio, cosine_knn, numeric_ratio
from .labels import TASKS, is_label_tag, subsample_zero_labels, tile_labels
from .probes import dummy_metric, train_probe

METHODS = ("geojepa_linear", "geojepa_mlp", "dummy", "tagpool_mlp", "tagcount_mlp")
MIN_POSITIVE_TEST = 30
TAGCOUNT_PAIRS = 512
LANDUSE_KEYS = ("landuse", "natural", "leisure")


@dataclass
class RegionTiles:
    """Everything evaluation needs about one region's tiles, in shard order."""

    region: str
    tile_ids: list[str]
    tile_xy: np.ndarray  # (T, 2) grid indices
    piece_tile: np.ndarray  # (P,) tile row of each piece
    tags: list[list[tuple[str, str]]]  # (P,) tags of each piece
    geom_type: list[str]
    geometry: np.ndarray  # (P, Dg) float32
    position: np.ndarray  # (P, 8) float32


def load_region(store: Store, region: str) -> RegionTiles:
    tiles, toks = store.current("tiles", region), store.current("tokens", region)
    ids, xy, piece_tile, tags, gtypes, geom, pos = [], [], [], [], [], [], []
    offset = 0
    for t_shard, k_shard in zip(tiles.manifest["shards"], toks.manifest["shards"]):
        t = pq.read_table(tiles.path / t_shard["tiles_file"], columns=["tile_id", "tile_x", "tile_y", "n_entities"])
        e = pq.read_table(tiles.path / t_shard["entities_file"], columns=["tags", "geom_type"])
        k = pq.read_table(toks.path / k_shard["tokens_file"], columns=["geometry_token", "position"])
        ids += t.column("tile_id").to_pylist()
        xy.append(np.column_stack([t.column("tile_x").to_numpy(), t.column("tile_y").to_numpy()]))
        piece_tile.append(offset + np.repeat(np.arange(t.num_rows), t.column("n_entities").to_numpy()))
        offset += t.num_rows
        tags += e.column("tags").to_pylist()
        gtypes += e.column("geom_type").to_pylist()
        geom.append(fixed_list_to_numpy(k.column("geometry_token")))
        pos.append(fixed_list_to_numpy(k.column("position")))
    return RegionTiles(region, ids, np.concatenate(xy), np.concatenate(piece_tile), tags, gtypes,
                       np.concatenate(geom), np.concatenate(pos))


def _masked(tags, drop: Callable[[str, str], bool]) -> tuple[list, pa.Array]:
    """The pieces' tags without those ``drop`` flags: as Python lists and as a map<string, string> column."""
    kept = [[(k, v) for k, v in t if not drop(k, v)] for t in tags]
    return kept, pa.array(kept, pa.map_(pa.string(), pa.string()))


@torch.no_grad()
def tile_embeddings(model, r: RegionTiles, tag_tokens: np.ndarray, max_tokens: int, batch: int = 128) -> np.ndarray:
    """(T, 2d) target-encoder embeddings, pooled over valid tokens only."""
    n_tiles = len(r.tile_ids)
    order = np.argsort(r.piece_tile, kind="stable")
    starts = np.searchsorted(r.piece_tile[order], np.arange(n_tiles))
    ends = np.searchsorted(r.piece_tile[order], np.arange(n_tiles), side="right")
    out = []
    for s in range(0, n_tiles, batch):
        rows = range(s, min(s + batch, n_tiles))
        length = max(1, max(min(ends[t] - starts[t], max_tokens) for t in rows))
        b = len(rows)
        tag = np.zeros((b, length, tag_tokens.shape[1]), np.float32)
        geom = np.zeros((b, length, r.geometry.shape[1]), np.float32)
        pos = np.zeros((b, length, 8), np.float32)
        valid = np.zeros((b, length), bool)
        for i, t in enumerate(rows):
            idx = order[starts[t]:min(ends[t], starts[t] + max_tokens)]
            n = len(idx)
            tag[i, :n], geom[i, :n], pos[i, :n], valid[i, :n] = tag_tokens[idx], r.geometry[idx], r.position[idx], True
        emb = model.tile_embedding({"tag": torch.from_numpy(tag), "geometry": torch.from_numpy(geom),
                                    "position": torch.from_numpy(pos), "valid": torch.from_numpy(valid)})
        out.append(emb.numpy())
    return np.concatenate(out)


def _per_tile_mean(values: np.ndarray, piece_tile: np.ndarray, n_tiles: int) -> np.ndarray:
    sums = np.zeros((n_tiles, values.shape[1]))
    np.add.at(sums, piece_tile, values)
    return sums / np.maximum(np.bincount(piece_tile, minlength=n_tiles), 1)[:, None]


def _tag_counts(tags, piece_tile, n_tiles, vocab_pairs: list[tuple[str, str]]) -> np.ndarray:
    col = {kv: i for i, kv in enumerate(vocab_pairs)}
    out = np.zeros((n_tiles, len(vocab_pairs)), np.float32)
    for t, pt in zip(tags, piece_tile):
        for kv in t:
            j = col.get(kv)
            if j is not None:
                out[pt, j] += 1
    return out


@dataclass
class Evaluation:
    metrics: dict
    skipped: dict = field(default_factory=dict)
    embeddings: np.ndarray | None = None  # building-masked embeddings of every tile (for kNN views)
    tile_ids: list = field(default_factory=list)
    tile_regions: list = field(default_factory=list)
    tile_pieces: np.ndarray | None = None  # (T,) entity pieces per tile


def evaluate(model, vocab, store: Store, regions: list[str], variant: str, model_version: str,
             seeds=(0, 1, 2), k: int = 5, max_tokens: int = 128, split_seed: int = 0,
             log: Callable[[str], None] = print) -> Evaluation:
    """Metrics in the shape of DESIGN's metrics.json (see the module docstring)."""
    data = [load_region(store, name) for name in sorted(regions)]
    # the pairs for tagcount: the most frequent over all regions
    freq: dict = {}
    for r in data:
        for t in r.tags:
            for kv in t:
                freq[kv] = freq.get(kv, 0) + 1
    top_pairs = [kv for kv, _ in sorted(freq.items(), key=lambda x: -x[1])[:TAGCOUNT_PAIRS]]
    tasks: dict = {}
    skipped: dict = {}
    knn: dict = {}
    per_task_emb: dict = {}
    all_labels = {}
    split = np.concatenate([tile_split(r.region, r.tile_xy[:, 0], r.tile_xy[:, 1], split_seed) for r in data])
    region_labels = [tile_labels(r.tile_ids, [r.tile_ids[i] for i in r.piece_tile], r.tags, r.geom_type) for r in data]
    for task in TASKS:
        drop = lambda kk, vv, task=task: is_label_tag(task, kk, vv)  # noqa: E731
        emb, pool, count, y, defined = [], [], [], [], []
        for r, labels in zip(data, region_labels):
            kept, masked = _masked(r.tags, drop)
            tokens = vocab.tag_tokens(masked)
            emb.append(tile_embeddings(model, r, tokens, max_tokens))
            pool.append(_per_tile_mean(tokens, r.piece_tile, len(r.tile_ids)))
            count.append(_tag_counts(kept, r.piece_tile, len(r.tile_ids), top_pairs))
            lab, ok = labels[task]
            y.append(lab)
            defined.append(ok)
        emb, pool, count = np.concatenate(emb), np.concatenate(pool), np.concatenate(count)
        y, defined = np.concatenate(y), np.concatenate(defined)
        per_task_emb[task] = emb
        all_labels[task] = (y, defined)
        results = {m: [] for m in METHODS}
        n_test = 0
        for seed in seeds:
            use = subsample_zero_labels(task, y, defined, seed)
            tr, va, te = (np.flatnonzero(use & (split == s)) for s in (0, 1, 2))
            positives = int((y[te] > 0).sum())
            if positives < MIN_POSITIVE_TEST or len(tr) < 10 or len(va) < 2:
                skipped[task] = f"{positives} positive test tiles (< {MIN_POSITIVE_TEST}) or too few tiles"
                break
            n_test = len(te)
            for name, feats, kind in (("geojepa_linear", emb, "linear"), ("geojepa_mlp", emb, "mlp"),
                                      ("tagpool_mlp", pool, "mlp"), ("tagcount_mlp", count, "mlp")):
                res = train_probe(kind, task, feats[tr], y[tr], feats[va], y[va], feats[te], y[te], seed=seed)
                results[name].append(res.mae)
            results["dummy"].append(dummy_metric(task, y[tr], y[te]))
        if task in skipped:
            log(f"evaluation: {task} skipped ({skipped[task]})")
            continue
        tasks[task] = {m: {"mae": float(np.mean(v)), "mae_std": float(np.std(v)), "n_test": n_test} for m, v in results.items()}
        log(f"evaluation: {task}: " + ", ".join(f"{m} {tasks[task][m]['mae']:.3f}±{tasks[task][m]['mae_std']:.3f}" for m in METHODS))
    # ---- kNN, each label with its own masked embeddings ----------------------------------------
    for task in ("building_count", "max_speed"):
        y, ok = all_labels[task]
        idx = np.flatnonzero(ok)
        if len(idx) > k + 1:
            near, rand, ratio = numeric_ratio(y[idx], cosine_knn(per_task_emb[task][idx], k))
            knn[task] = {"neighbour_mean_abs_diff": near, "random_mean_abs_diff": rand, "ratio": ratio, "k": k, "n": len(idx)}
    y, _ = all_labels["bridge"]
    if len(y) > k + 1:
        near, rand, ratio = agreement_ratio(y, cosine_knn(per_task_emb["bridge"], k))
        knn["bridge"] = {"neighbour_agreement": near, "random_agreement": rand, "ratio": ratio, "k": k, "n": len(y)}
    landuse_emb, landuse_cls = [], []
    for r in data:
        _, masked = _masked(r.tags, lambda kk, vv: kk in LANDUSE_KEYS)
        landuse_emb.append(tile_embeddings(model, r, vocab.tag_tokens(masked), max_tokens))
        landuse_cls.append(_landuse_class(r))
    lemb, lcls = np.concatenate(landuse_emb), np.concatenate(landuse_cls)
    has = lcls != ""
    if has.sum() > k + 1:
        near, rand, ratio = agreement_ratio(lcls[has], cosine_knn(lemb[has], k))
        knn["landuse"] = {"neighbour_agreement": near, "random_agreement": rand, "ratio": ratio, "k": k, "n": int(has.sum())}
    metrics = {"variant": variant, "model_version": model_version, "regions": sorted(regions), "tasks": tasks,
               "knn": knn, "skipped": skipped, "seeds": list(seeds), "split": "4x4-tile blocks, 70/15/15"}
    ids = [t for r in data for t in r.tile_ids]
    regs = [r.region for r in data for _ in r.tile_ids]
    pieces = np.concatenate([np.bincount(r.piece_tile, minlength=len(r.tile_ids)) for r in data])
    return Evaluation(metrics, skipped, per_task_emb["building_count"], ids, regs, pieces)


def _landuse_class(r: RegionTiles) -> np.ndarray:
    """Per tile: the most frequent landuse / natural / leisure value ("" if none)."""
    counts: list[dict] = [dict() for _ in r.tile_ids]
    for t, pt in zip(r.tags, r.piece_tile):
        for kk, vv in t:
            if kk in LANDUSE_KEYS:
                c = counts[pt]
                c[f"{kk}={vv}"] = c.get(f"{kk}={vv}", 0) + 1
    return np.array([max(c, key=c.get) if c else "" for c in counts], dtype=object)


def metrics_table_markdown(metrics: dict) -> str:
    """The task x method table (mean ± std over seeds; MAE, or error rate for the binary tasks)."""
    head = "| task | " + " | ".join(METHODS) + " | n_test |\n|" + " --- |" * (len(METHODS) + 2)
    rows = []
    for task, res in metrics["tasks"].items():
        cells = [f"{res[m]['mae']:.3f} ± {res[m]['mae_std']:.3f}" for m in METHODS]
        rows.append(f"| {task} | " + " | ".join(cells) + f" | {res['dummy']['n_test']} |")
    for task, why in metrics.get("skipped", {}).items():
        rows.append(f"| {task} | skipped: {why} |" + " |" * len(METHODS))
    return head + "\n" + "\n".join(rows)

