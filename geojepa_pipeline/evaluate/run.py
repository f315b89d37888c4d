"""Evaluate a checkpoint under the masked protocol: probes, controls and baselines on the one split, measured kNN.

Pure: takes arrays (``RegionData``, loaded by ``stages.evaluation``), models and a tag vocabulary.

Protocol, per task (``labels.py``): the task's input is each tile's entity pieces with the label's
entities removed (every piece, so every modality) and its label tags stripped from the rest;
tag tokens are rebuilt from the stripped tags with the vocabulary; image variants get each
tile's chip, re-rendered from the masked entities where the imagery is synthetic (``chips``).
Every piece of a tile is embedded (no cap: long tiles are batched by length), with the target
encoder, as concat(mean, max) over valid tokens.

Methods, each on the same masked input and the same tiles:
- ``geojepa_linear`` / ``geojepa_mlp``: probes on the checkpoint's tile embeddings;
- ``random_init_linear`` / ``random_init_mlp``: the same architecture and embedding with the
  untrained weights training started from (what pretraining added is the gap to these);
- ``tagpool_mlp``: mean of the kept pieces' tag tokens; ``tagcount_mlp``: counts of the 512
  most frequent tag pairs of the task's masked train tiles; ``dummy``: the train median.

Splits (``geo.splits``, the one training used, with the checkpoint's split seed): probes fit on
the train tiles of the pretraining regions, stop early on their validation tiles, and are scored
on their test tiles (``tasks``), which pretraining never read. ``transfer`` scores the same
probes on every tile of the held-out regions, which pretraining never saw at all. A task with
fewer than 30 positive test tiles is skipped, and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import torch

from ..geo.splits import TEST, TRAIN, VAL, split_counts, tile_split
from ..model.config import VARIANTS
from .knn import agreement_ratio, cosine_knn, numeric_ratio
from .labels import (
    TASKS, Pieces, TaskInput, implausible_maxspeeds, landuse_class, subsample_zero_labels, task_input, tile_labels, unmasked_input,
)
from .probes import dummy_metric, train_probe

METHODS = ("geojepa_linear", "geojepa_mlp", "random_init_linear", "random_init_mlp", "dummy", "tagpool_mlp", "tagcount_mlp")
MIN_POSITIVE_TEST = 30
TAGCOUNT_PAIRS = 512
TOKEN_BUDGET = 16_384  # tokens (padding included) per embedding forward pass
MAX_BATCH_TILES = 256
KNN_LABELS = ("building_count", "max_speed", "bridge", "landuse")


class ChipSource(Protocol):
    """A region's image chips for the image variants under a task's masked input (``labels.TaskInput``)."""

    kind: str  # synthetic | files | stac | none

    def changed(self, inp: TaskInput) -> np.ndarray:
        """(T,) bool: tiles whose chip differs from the stored one under ``inp``."""

    def chips(self, rows: np.ndarray, inp: TaskInput) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, 224, 224, 4) uint8, has_image (n,) bool) of the tiles ``rows`` under ``inp``."""


@dataclass
class RegionData:
    """What evaluation needs of one region, in shard order (a tile's pieces are contiguous).

    tile_x, tile_y (T,) indices on the UTM grid ``epsg``; pieces (P,) the entity pieces; geometry (P, Dg) and position
    (P, 8) float32 their tokens; members the ``relation_members`` table (or None); imagery the kind
    of scenes the region's chips came from; chips their source (None: no image variant)."""

    region: str
    epsg: int  # the UTM grid of tile_x, tile_y
    tile_ids: list[str]
    tile_x: np.ndarray
    tile_y: np.ndarray
    pieces: Pieces
    geometry: np.ndarray
    position: np.ndarray
    members: pa.Table | None = None
    imagery: str = "none"
    chips: ChipSource | None = None

    @property
    def n_tiles(self) -> int:
        return len(self.tile_ids)


# ---- embedding -------------------------------------------------------------------------------
def _bucket(length: int) -> int:
    """The padded length of a batch whose longest tile has ``length`` tokens: the next power of two, at least 16."""
    return max(16, 1 << max(0, int(length) - 1).bit_length())


def _length_batches(lengths: np.ndarray, extra_tokens: int = 0) -> list[tuple[np.ndarray, int]]:
    """Tiles sorted by length, cut into batches of at most ``TOKEN_BUDGET`` tokens (padding and ``extra_tokens``
    per tile included): [(tile rows, padded length)]. No tile is cut: a long tile gets a batch of its own."""
    order = np.argsort(lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        size = min(MAX_BATCH_TILES, len(order) - start)
        while size > 1 and size * (_bucket(lengths[order[start + size - 1]]) + extra_tokens) > TOKEN_BUDGET:
            size = max(1, min(size - 1, TOKEN_BUDGET // (_bucket(lengths[order[start + size - 1]]) + extra_tokens)))
        rows = order[start:start + size]
        out.append((rows, _bucket(lengths[rows[-1]])))
        start += size
    return out


IMAGE_CHUNK = 256  # tiles per chunk with images: one Parquet row group of chips (imagery.IMAGE_ROW_GROUP)


@torch.no_grad()
def embed_tiles(model, r: RegionData, tag_tokens: np.ndarray, inp: TaskInput, rows: np.ndarray | None = None,
                images: bool = False) -> np.ndarray:
    """(len(rows), 2d) target-encoder embeddings of tiles ``rows`` (default all) from the pieces ``inp`` keeps.

    tag_tokens (P, Dt) of every piece (only kept ones are read). Every kept piece is a token; tiles are
    batched by length. With ``images`` the chips come from ``r.chips`` under ``inp``, in chunks of
    consecutive tiles (one row group of chips at a time), length-batched within each chunk."""
    rows = np.arange(r.n_tiles) if rows is None else np.asarray(rows)
    idx = np.flatnonzero(inp.kept)
    tile_of = r.pieces.tile[idx]
    starts = np.searchsorted(tile_of, rows)
    ends = np.searchsorted(tile_of, rows, side="right")
    lengths = ends - starts
    out = np.zeros((len(rows), 2 * model.cfg.dim), np.float32)
    chunks = [np.arange(len(rows))]
    if images:
        order = np.argsort(rows, kind="stable")
        chunks = [order[i:i + IMAGE_CHUNK] for i in range(0, len(order), IMAGE_CHUNK)]
    for chunk in chunks:
        for local, length in _length_batches(lengths[chunk], 196 if images else 0):
            batch_rows = chunk[local]
            b = len(batch_rows)
            tag = np.zeros((b, length, tag_tokens.shape[1]), np.float32)
            geom = np.zeros((b, length, r.geometry.shape[1]), np.float32)
            pos = np.zeros((b, length, 8), np.float32)
            valid = np.zeros((b, length), bool)
            for i, j in enumerate(batch_rows):
                sel = idx[starts[j]:ends[j]]
                n = len(sel)
                tag[i, :n], geom[i, :n], pos[i, :n], valid[i, :n] = tag_tokens[sel], r.geometry[sel], r.position[sel], True
            batch = {"tag": torch.from_numpy(tag), "geometry": torch.from_numpy(geom), "position": torch.from_numpy(pos),
                     "valid": torch.from_numpy(valid)}
            if images:
                chips, has = r.chips.chips(rows[batch_rows], inp)
                batch["images"], batch["has_image"] = torch.from_numpy(np.ascontiguousarray(chips)), torch.from_numpy(has)
            out[batch_rows] = model.tile_embedding(batch).numpy()
    return out


def _changed_tiles(r: RegionData, inp: TaskInput, images: bool) -> np.ndarray:
    """(T,) bool: tiles whose input differs from the unmasked one (a piece removed or a tag stripped, or a new chip)."""
    n_tags = np.diff(np.asarray(r.pieces.tags.offsets, np.int64))
    n_kept_tags = np.diff(np.asarray(inp.tags.offsets, np.int64))
    touched = ~inp.kept | (n_tags != n_kept_tags)
    changed = np.bincount(r.pieces.tile[touched], minlength=r.n_tiles) > 0
    if images and r.chips is not None:
        changed |= r.chips.changed(inp)
    return changed


# ---- baselines' features -----------------------------------------------------------------------
def _per_tile_mean(values: np.ndarray, tile: np.ndarray, n_tiles: int) -> np.ndarray:
    """(T, D) mean of ``values`` (N, D) per tile row ``tile`` (N,); zeros for a tile with none."""
    sums = np.zeros((n_tiles, values.shape[1]))
    np.add.at(sums, tile, values)
    return sums / np.maximum(np.bincount(tile, minlength=n_tiles), 1)[:, None]


def _pair_ids(tags: pa.MapArray) -> tuple[np.ndarray, np.ndarray]:
    """(pair strings (Q,) object "key=value", owner piece (Q,) int64) of a map array with offsets from 0."""
    offsets = np.asarray(tags.offsets, np.int64)
    n = int(offsets[-1]) if len(offsets) else 0
    keys = np.asarray(tags.keys.slice(0, n).to_numpy(zero_copy_only=False), object)
    values = np.asarray(tags.items.slice(0, n).to_numpy(zero_copy_only=False), object)
    return keys + "=" + values, np.repeat(np.arange(len(tags)), np.diff(offsets))


def _tag_counts(pairs: np.ndarray, tile: np.ndarray, n_tiles: int, vocab_pairs: list[str]) -> np.ndarray:
    """(T, V) float32 counts of ``vocab_pairs`` among ``pairs`` (Q,) owned by tile rows ``tile`` (Q,)."""
    col = {p: i for i, p in enumerate(vocab_pairs)}
    j = np.fromiter((col.get(p, -1) for p in pairs), np.int64, len(pairs))
    out = np.zeros((n_tiles, len(vocab_pairs)), np.float32)
    hit = j >= 0
    np.add.at(out, (tile[hit], j[hit]), 1.0)
    return out


# ---- the evaluation ----------------------------------------------------------------------------
@dataclass
class Features:
    """Per task, over every evaluated tile (pretraining regions first, then held-out ones, in region order)."""

    embeddings: dict  # model name -> (T, 2d)
    tagpool: np.ndarray  # (T, Dt)
    tagcount: np.ndarray  # (T, 512)
    labels: np.ndarray  # (T,)
    defined: np.ndarray  # (T,) bool
    pieces_in: np.ndarray  # (T,) pieces in the masked input
    classes: np.ndarray | None = None  # (T,) object: a categorical label ("landuse": ``labels.landuse_class``)


@dataclass
class Evaluation:
    metrics: dict
    features: dict = field(default_factory=dict)  # task -> Features
    tile_ids: list = field(default_factory=list)
    tile_regions: list = field(default_factory=list)
    tile_split: np.ndarray | None = None  # (T,) 0/1/2 in-region split; -1 for held-out regions
    tile_xy: np.ndarray | None = None  # (T, 2)
    tile_pieces: np.ndarray | None = None  # (T,) entity pieces per tile, unmasked

    @property
    def embeddings(self) -> np.ndarray:
        """(T, 2d) the checkpoint's building-masked tile embeddings (the kNN views)."""
        return self.features["building_count"].embeddings["geojepa"]


def _probe_rows(task: str, f: Features, split: np.ndarray, test: np.ndarray, seed: int):
    use = subsample_zero_labels(task, f.labels, f.defined, seed)
    return (np.flatnonzero(use & (split == TRAIN)), np.flatnonzero(use & (split == VAL)), np.flatnonzero(use & test))


def _score(task: str, f: Features, split: np.ndarray, test_mask: np.ndarray, seeds) -> tuple[dict | None, str | None]:
    """{method: {"mae", "mae_std", "n_test", "n_train"}} over ``seeds``, or (None, why skipped)."""
    results = {m: [] for m in METHODS}
    n_test = n_train = 0
    for seed in seeds:
        tr, va, te = _probe_rows(task, f, split, test_mask, seed)
        positives = int((f.labels[te] > 0).sum())
        if positives < MIN_POSITIVE_TEST or len(tr) < 10 or len(va) < 2:
            return None, f"{positives} positive test tiles (< {MIN_POSITIVE_TEST}), {len(tr)} train, {len(va)} validation"
        n_test, n_train = len(te), len(tr)
        y = f.labels
        for method in METHODS:
            if method == "dummy":
                results[method].append(dummy_metric(task, y[tr], y[te]))
                continue
            kind = method.rsplit("_", 1)[1]
            feats = {"tagpool_mlp": f.tagpool, "tagcount_mlp": f.tagcount}.get(method)
            if feats is None:
                feats = f.embeddings[method.rsplit("_", 1)[0]]
            res = train_probe(kind, task, feats[tr], y[tr], feats[va], y[va], feats[te], y[te], seed=seed)
            results[method].append(res.mae)
    return ({m: {"mae": float(np.mean(v)), "mae_std": float(np.std(v)), "n_test": n_test, "n_train": n_train}
             for m, v in results.items()}, None)


def evaluate(models: dict, vocab, regions: list[RegionData], variant: str, model_version: str,
             holdout: list[RegionData] | None = None, seeds=(0, 1, 2), k: int = 5, split_seed: int = 0,
             uses_images: bool = False, log: Callable[[str], None] = print) -> Evaluation:
    """Metrics in the shape of DESIGN's metrics.json plus ``protocol`` and ``transfer`` (the module docstring).

    models: {"geojepa": trained, "random_init": untrained}, both in eval mode. ``regions`` are the
    checkpoint's pretraining regions, ``holdout`` regions it never saw."""
    holdout = holdout or []
    data = sorted(regions, key=lambda r: r.region) + sorted(holdout, key=lambda r: r.region)
    n_in = sum(r.n_tiles for r in data[:len(regions)])
    split = np.concatenate([tile_split(r.epsg, r.tile_x, r.tile_y, split_seed) for r in data[:len(regions)]]
                           + [np.full(r.n_tiles, -1, np.int8) for r in data[len(regions):]])
    in_region_test = split == TEST
    transfer_test = np.arange(len(split)) >= n_in
    is_train = split == TRAIN
    labels = [tile_labels(r.pieces) for r in data]
    pieces_per_tile = np.concatenate([np.bincount(r.pieces.tile, minlength=r.n_tiles) for r in data])
    features: dict[str, Features] = {}
    masking: dict = {}
    base = {}  # unmasked: a task re-embeds only the tiles it changes
    t0 = time.perf_counter()
    for i, r in enumerate(data):
        tokens = vocab.tag_tokens(r.pieces.tags)
        for name, model in models.items():
            base[name, i] = embed_tiles(model, r, tokens, unmasked_input(r.pieces), images=uses_images)
    log(f"evaluation: embedded {len(split):,} tiles, {sum(len(r.pieces) for r in data):,} pieces, with "
        f"{' and '.join(models)} in {time.perf_counter() - t0:.1f} s")
    for task in (*TASKS, "landuse"):
        t0, n_changed = time.perf_counter(), 0
        embs = {name: [] for name in models}
        pool, pairs_of, y, defined, kept_n = [], [], [], [], []
        offset = 0
        for i, (r, lab) in enumerate(zip(data, labels)):
            inp = task_input(task, r.pieces, r.members)
            masking.setdefault(r.region, {})[task] = inp.counts()
            tokens = vocab.tag_tokens(inp.tags)
            changed = np.flatnonzero(_changed_tiles(r, inp, uses_images))
            n_changed += len(changed)
            for name, model in models.items():
                emb = base[name, i].copy()
                if len(changed):
                    emb[changed] = embed_tiles(model, r, tokens, inp, changed, images=uses_images)
                embs[name].append(emb)
            kept_tile = r.pieces.tile[inp.kept]
            pool.append(_per_tile_mean(tokens[inp.kept], kept_tile, r.n_tiles))
            pair, owner = _pair_ids(inp.tags)
            keep_pair = inp.kept[owner]
            pairs_of.append((pair[keep_pair], offset + r.pieces.tile[owner[keep_pair]]))
            kept_n.append(np.bincount(kept_tile, minlength=r.n_tiles))
            lab_task = lab.get(task, (np.zeros(r.n_tiles), np.zeros(r.n_tiles, bool)))
            y.append(lab_task[0])
            defined.append(lab_task[1])
            offset += r.n_tiles
        removed = sum(masking[r.region][task]["removed_entities"] for r in data)
        log(f"evaluation: {task} input: {removed:,} entities removed, {n_changed:,} tiles changed and embedded again "
            f"in {time.perf_counter() - t0:.1f} s")
        # tagcount's pairs: the most frequent among the masked input of the pretraining regions' train tiles
        all_pairs = np.concatenate([p for p, _ in pairs_of])
        all_owner = np.concatenate([o for _, o in pairs_of])
        uniq, counts = np.unique(all_pairs[is_train[all_owner]], return_counts=True)
        top = [str(p) for p in uniq[np.lexsort((uniq, -counts))][:TAGCOUNT_PAIRS]]
        features[task] = Features({n: np.concatenate(v) for n, v in embs.items()}, np.concatenate(pool),
                                  _tag_counts(all_pairs, all_owner, len(split), top), np.concatenate(y),
                                  np.concatenate(defined), np.concatenate(kept_n),
                                  np.concatenate([landuse_class(r.pieces) for r in data]) if task == "landuse" else None)
    tasks, transfer, skipped, transfer_skipped = {}, {}, {}, {}
    for task in TASKS:
        f = features[task]
        res, why = _score(task, f, split, in_region_test, seeds)
        if res is None:
            skipped[task] = why
            log(f"evaluation: {task} skipped ({why})")
        else:
            tasks[task] = res
            log(f"evaluation: {task}: " + ", ".join(f"{m} {res[m]['mae']:.3f}±{res[m]['mae_std']:.3f}" for m in METHODS))
        if holdout:
            res, why = _score(task, f, split, transfer_test, seeds)
            if res is None:
                transfer_skipped[task] = why
            else:
                transfer[task] = res
                log(f"evaluation (transfer to {', '.join(r.region for r in holdout)}): {task}: "
                    + ", ".join(f"{m} {res[m]['mae']:.3f}" for m in METHODS))
    knn = _knn(features, k)
    building = features["building_count"]
    protocol = {
        "masking": "entities",
        "masking_rules": "labels.py: the reference task generator's removals; removal by entity, every piece, every modality",
        "split": {"method": "geo.splits: 4x4-tile blocks (1.2 km), 14/3/3 of every 4x5-block super-cell",
                  "split_seed": split_seed, "shares": [0.70, 0.15, 0.15], "pretraining": "train tiles of the pretraining regions",
                  "checkpoint_choice": "validation tiles (epoch-end probe)", "probes": "fit on train, early stopping on validation, scored on test",
                  "tiles": {r.region: split_counts(tile_split(r.epsg, r.tile_x, r.tile_y, split_seed)) for r in data[:len(regions)]}},
        "modalities": {m: _modalities(m, variant) for m in METHODS},
        "imagery": {r.region: r.imagery for r in data},
        "max_pieces": None,
        "holdout_regions": [r.region for r in holdout],
        "masked_input": masking,
        "implausible_maxspeed": {r.region: implausible_maxspeeds(r.pieces) for r in data},  # values > 300 km/h: no label
        "label_piece_correlation": {"building_count": _correlations(building.labels, pieces_per_tile, building.pieces_in)},
        "seeds": list(seeds),
    }
    metrics = {"variant": variant, "model_version": model_version, "regions": [r.region for r in data[:len(regions)]],
               "tasks": tasks, "transfer": transfer, "knn": knn, "skipped": skipped, "transfer_skipped": transfer_skipped,
               "seeds": list(seeds), "protocol": protocol}
    return Evaluation(metrics, features, [t for r in data for t in r.tile_ids], [r.region for r in data for _ in r.tile_ids],
                      split, np.concatenate([np.column_stack([r.tile_x, r.tile_y]) for r in data]), pieces_per_tile)


def _modalities(method: str, variant: str) -> list[str]:
    if method.startswith(("geojepa", "random_init")):
        return [name for fed, name in zip(VARIANTS[variant], ("tags", "geometry", "image")) if fed]
    return {"tagpool_mlp": ["tags"], "tagcount_mlp": ["tags"], "dummy": []}[method]


def _correlations(labels: np.ndarray, unmasked: np.ndarray, masked: np.ndarray) -> dict:
    """Pearson r of a count label with the pieces per tile of the unmasked and of the masked input."""
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")  # noqa: E731
    return {"unmasked_input": r(labels, unmasked), "masked_input": r(labels, masked)}


def _knn(features: dict, k: int) -> dict:
    """kNN ratios to random tiles per label, each with its own masked embeddings, for the trained and untrained model."""
    out = {}
    for label in KNN_LABELS:
        f = features[label]
        if label == "landuse":
            y, ok = f.classes, f.classes != ""
        else:
            y, ok = f.labels, f.defined if label == "max_speed" else np.ones(len(f.labels), bool)
        idx = np.flatnonzero(ok)
        if len(idx) <= k + 1:
            continue
        categorical = label in ("bridge", "landuse")
        entry = {"k": k, "n": len(idx)}
        for name, emb in f.embeddings.items():
            nn = cosine_knn(emb[idx], k)
            near, rand, ratio = (agreement_ratio if categorical else numeric_ratio)(y[idx], nn)
            prefix = "" if name == "geojepa" else f"{name}_"
            keys = ("neighbour_agreement", "random_agreement") if categorical else ("neighbour_mean_abs_diff", "random_mean_abs_diff")
            entry.update({f"{prefix}{keys[0]}": near, f"{prefix}{keys[1]}": rand, f"{prefix}ratio": ratio})
        out[label] = entry
    return out


def metrics_table_markdown(metrics: dict, which: str = "tasks") -> str:
    """The task x method table (mean ± std over seeds; MAE, or error rate for the binary tasks) of ``which``
    (``tasks``: in-region test tiles; ``transfer``: the held-out regions)."""
    head = "| task | " + " | ".join(METHODS) + " | n_test |\n|" + " --- |" * (len(METHODS) + 2)
    rows = []
    for task, res in metrics.get(which, {}).items():
        cells = [f"{res[m]['mae']:.3f} ± {res[m]['mae_std']:.3f}" if m in res else "–" for m in METHODS]
        rows.append(f"| {task} | " + " | ".join(cells) + f" | {res['dummy']['n_test']} |")
    for task, why in metrics.get("skipped" if which == "tasks" else "transfer_skipped", {}).items():
        rows.append(f"| {task} | skipped: {why} |" + " |" * len(METHODS))
    return head + "\n" + "\n".join(rows)
