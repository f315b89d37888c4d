"""Masking strategies: which tokens are context and which are prediction targets.

Shapes: ``valid`` (B, L) bool marks real tokens (not padding); ``centroid`` (B, L, 2) is the
min-box centre of each token in tile units; ``modality`` (B, L) long (1 OSM, 2 image).
Every strategy returns ``targets`` (B, K, L) bool; ``context_from_targets`` gives the context
(B, L) bool. One strategy is drawn per batch (``sample_masks``).
"""

from __future__ import annotations


import torch


def random_targets(valid: torch.Tensor, n_targets: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """K targets, each ``fraction`` of the valid tokens drawn uniformly, independently (they may overlap)."""
    b, length = valid.shape
    scores = torch.rand(b, n_targets, length, generator=gen)
    scores = scores.masked_fill(~valid[:, None, :], 2.0)  # padding sorts last
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    count = torch.clamp((valid.sum(1).float() * fraction).round().long(), min=1)
    return (rank < count[:, None, None]) & valid[:, None, :]


def area_targets(valid: torch.Tensor, centroid: torch.Tensor, n_targets: int, fraction: float, gen: torch.Generator,
                 aspect: tuple[float, float] = (0.5, 2.0), span: tuple[float, float] = (-0.1, 1.1)) -> torch.Tensor:
    """K boxes of area ``fraction`` of the tile, aspect ratio U[aspect], corners in ``span``; a token is
    a target if its centroid falls inside. A box that catches nothing falls back to random targets."""
    b, length = valid.shape
    ratio = torch.empty(b, n_targets).uniform_(*aspect, generator=gen)
    w = torch.sqrt(fraction * ratio).clamp(max=span[1] - span[0])
    h = torch.sqrt(fraction / ratio).clamp(max=span[1] - span[0])
    x0 = span[0] + torch.rand(b, n_targets, generator=gen) * (span[1] - span[0] - w)
    y0 = span[0] + torch.rand(b, n_targets, generator=gen) * (span[1] - span[0] - h)
    cx, cy = centroid[..., 0][:, None, :], centroid[..., 1][:, None, :]
    inside = (cx >= x0[..., None]) & (cx < (x0 + w)[..., None]) & (cy >= y0[..., None]) & (cy < (y0 + h)[..., None])
    targets = inside & valid[:, None, :]
    empty = ~targets.any(-1)  # (B, K)
    if empty.any():
        targets = torch.where(empty[..., None], random_targets(valid, n_targets, fraction, gen), targets)
    return targets


def modality_targets(valid: torch.Tensor, modality: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One target (K = 1): per sample, one present modality is the context, all other valid tokens are targets.
    A sample with a single modality gets random targets instead."""
    b, _ = valid.shape
    present = torch.stack([(valid & (modality == m)).any(1) for m in (1, 2)], 1)  # (B, 2)
    pick = torch.rand(b, generator=gen) < 0.5
    ctx_mod = torch.where(present.all(1), torch.where(pick, 1, 2), torch.where(present[:, 0], 1, 2))
    targets = valid & (modality != ctx_mod[:, None])
    single = ~present.all(1)
    if single.any():
        targets = torch.where(single[:, None], random_targets(valid, 1, 0.45, gen)[:, 0], targets)
    return targets[:, None, :]


def context_from_targets(valid: torch.Tensor, targets: torch.Tensor, min_context: float, gen: torch.Generator):
    """Context = valid minus the union of targets; if under ``min_context`` of the valid tokens, a contiguous
    run of valid tokens is moved from the targets back to the context. Returns (context (B, L), targets (B, K, L))."""
    context = valid & ~targets.any(1)
    n_valid = valid.sum(1)
    need = torch.clamp((n_valid.float() * min_context).ceil().long(), min=1) - context.sum(1)
    for i in torch.nonzero(need > 0).flatten().tolist():
        idx = torch.nonzero(valid[i]).flatten()
        run = min(int(need[i]) + int(context[i].sum()), len(idx))
        start = int(torch.randint(0, max(1, len(idx) - run + 1), (1,), generator=gen))
        back = idx[start:start + run]
        context[i, back] = True
        targets[i, :, back] = False
    return context, targets


def sample_masks(mix: dict, valid: torch.Tensor, centroid: torch.Tensor, modality: torch.Tensor,
                 n_targets: int, fraction: float, min_context: float, gen: torch.Generator):
    """Draw one strategy for the batch from ``mix`` and build (strategy, context (B, L), targets (B, K, L))."""
    names = [k for k, p in mix.items() if p > 0]
    probs = torch.tensor([mix[k] for k in names], dtype=torch.float)
    strategy = names[int(torch.multinomial(probs / probs.sum(), 1, generator=gen))]
    if strategy == "random":
        targets = random_targets(valid, n_targets, fraction, gen)
    elif strategy == "area":
        targets = area_targets(valid, centroid, n_targets, fraction, gen)
    else:
        targets = modality_targets(valid, modality, gen)
    context, targets = context_from_targets(valid, targets, min_context, gen)
    return strategy, context, targets


def min_box_centroid(position: torch.Tensor) -> torch.Tensor:
    """(…, 8) min-box corners -> (…, 2) centre."""
    return position.reshape(*position.shape[:-1], 4, 2).mean(-2)
