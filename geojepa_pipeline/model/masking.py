"""Masking strategies: which tokens are context and which are prediction targets.

Shapes: ``valid`` (B, L) bool marks real tokens (not padding); ``centroid`` (B, L, 2) is the
min-box centre of each token in tile units; ``modality`` (B, L) int (``OSM`` 1, ``IMG`` 2).
Every strategy returns ``targets`` (B, K, L) bool; ``context_from_targets`` gives the context
(B, L) bool. One strategy is drawn per batch (``sample_masks``).

Masks are numpy, drawn on the CPU in the loader's thread (``model.geojepa.draw_masks``) from a
``numpy.random.Generator`` seeded per batch: the training step itself then has fixed shapes and
no data-dependent branches, and the loader runs no torch kernels (a second OpenMP team in the
loader's thread spin-waits against the step's own threads; measured: ~17 % of a 2-core step).
"""

from __future__ import annotations

import numpy as np

PAD, OSM, IMG = 0, 1, 2  # modality ids: padding, an OSM entity token, an image patch token


def random_targets(valid: np.ndarray, n_targets: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """K targets, each ``fraction`` of the valid tokens drawn uniformly, independently (they may overlap)."""
    b, length = valid.shape
    scores = np.where(valid[:, None, :], rng.random((b, n_targets, length), dtype=np.float32), 2.0)  # padding sorts last
    rank = scores.argsort(-1, kind="stable").argsort(-1, kind="stable")
    count = np.maximum(np.round(valid.sum(1) * fraction).astype(np.int64), 1)
    return (rank < count[:, None, None]) & valid[:, None, :]


def area_targets(valid: np.ndarray, centroid: np.ndarray, n_targets: int, fraction: float, rng: np.random.Generator,
                 aspect: tuple[float, float] = (0.5, 2.0), span: tuple[float, float] = (-0.1, 1.1)) -> np.ndarray:
    """K boxes of area ``fraction`` of the tile, aspect ratio U[aspect], corners in ``span``; a token is
    a target if its centroid falls inside. A box that catches nothing falls back to random targets."""
    b, length = valid.shape
    ratio = rng.uniform(*aspect, size=(b, n_targets))
    w = np.minimum(np.sqrt(fraction * ratio), span[1] - span[0])
    h = np.minimum(np.sqrt(fraction / ratio), span[1] - span[0])
    x0 = span[0] + rng.random((b, n_targets)) * (span[1] - span[0] - w)
    y0 = span[0] + rng.random((b, n_targets)) * (span[1] - span[0] - h)
    cx, cy = centroid[..., 0][:, None, :], centroid[..., 1][:, None, :]
    inside = (cx >= x0[..., None]) & (cx < (x0 + w)[..., None]) & (cy >= y0[..., None]) & (cy < (y0 + h)[..., None])
    targets = inside & valid[:, None, :]
    empty = ~targets.any(-1, keepdims=True)  # (B, K, 1)
    return np.where(empty, random_targets(valid, n_targets, fraction, rng), targets)


def modality_targets(valid: np.ndarray, modality: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One target (K = 1): per sample, one present modality is the context, all other valid tokens are targets.
    A sample with a single modality gets random targets instead."""
    b, _ = valid.shape
    present = np.stack([(valid & (modality == m)).any(1) for m in (OSM, IMG)], 1)  # (B, 2)
    pick = rng.random(b) < 0.5
    ctx_mod = np.where(present.all(1), np.where(pick, OSM, IMG), np.where(present[:, 0], OSM, IMG))
    targets = valid & (modality != ctx_mod[:, None])
    single = ~present.all(1, keepdims=True)
    targets = np.where(single, random_targets(valid, 1, 0.45, rng)[:, 0], targets)
    return targets[:, None, :]


def context_from_targets(valid: np.ndarray, targets: np.ndarray, min_context: float, rng: np.random.Generator):
    """Context = valid minus the union of targets; if under ``min_context`` of the valid tokens, a contiguous
    run of valid tokens is moved from the targets back to the context. Returns (context (B, L), targets (B, K, L)).

    Vectorised over the batch: the run starts at a uniform rank among the row's valid tokens.
    """
    context = valid & ~targets.any(1)
    n_valid = valid.sum(1)
    n_context = context.sum(1)
    need = np.maximum(np.ceil(n_valid * min_context).astype(np.int64), 1) - n_context  # (B,)
    run = np.minimum(need + n_context, n_valid)  # the run covers the whole required context
    start = (rng.random(valid.shape[0]) * (n_valid - run + 1)).astype(np.int64)
    rank = valid.cumsum(1) - 1  # (B, L) index of each valid token among its row's valid tokens
    back = valid & (need > 0)[:, None] & (rank >= start[:, None]) & (rank < (start + run)[:, None])
    return context | back, targets & ~back[:, None, :]


def sample_masks(mix: dict, valid: np.ndarray, centroid: np.ndarray, modality: np.ndarray,
                 n_targets: int, fraction: float, min_context: float, rng: np.random.Generator):
    """Draw one strategy for the batch from ``mix`` and build (strategy, context (B, L), targets (B, K, L))."""
    names = [k for k, p in mix.items() if p > 0]
    probs = np.array([mix[k] for k in names], float)
    strategy = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    if strategy == "random":
        targets = random_targets(valid, n_targets, fraction, rng)
    elif strategy == "area":
        targets = area_targets(valid, centroid, n_targets, fraction, rng)
    else:  # one target, padded with empty ones: every strategy gives the same shapes (static for compiled steps)
        targets = modality_targets(valid, modality, rng)
        targets = np.concatenate([targets, np.zeros((targets.shape[0], n_targets - 1, targets.shape[2]), bool)], 1)
    context, targets = context_from_targets(valid, targets, min_context, rng)
    return strategy, context, targets


def min_box_centroid(position):
    """(…, 8) min-box corners -> (…, 2) centre (numpy or torch)."""
    return position.reshape(*position.shape[:-1], 4, 2).mean(-2)
