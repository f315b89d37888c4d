"""Masking strategies: shapes, fractions, boxes, modalities, minimum context."""

from __future__ import annotations

import torch

from geojepa_pipeline.model.masking import (
    area_targets, context_from_targets, min_box_centroid, modality_targets, random_targets, sample_masks,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def lengths_mask(lengths, L):
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]


def test_random_targets_take_the_fraction_of_valid_tokens_only():
    valid = lengths_mask([20, 7, 1], 24)
    t = random_targets(valid, 4, 0.45, gen())
    assert t.shape == (3, 4, 24)
    assert not (t & ~valid[:, None]).any()
    assert t.sum(-1)[0].tolist() == [9] * 4 and t.sum(-1)[1].tolist() == [3] * 4 and t.sum(-1)[2].tolist() == [1] * 4
    assert not torch.equal(t[0, 0], t[0, 1])  # independent draws


def test_area_targets_use_centroids_inside_boxes():
    B, L = 2, 400
    valid = torch.ones(B, L, dtype=torch.bool)
    xy = torch.rand(B, L, 2, generator=gen(1))
    t = area_targets(valid, xy, 4, 0.45, gen(2))
    frac = t.float().mean(-1)
    assert t.shape == (B, 4, L) and (frac > 0.15).all() and (frac < 0.75).all()
    # each target is an axis-aligned box: its tokens' bounding box holds no non-target token strictly inside
    for b in range(B):
        for k in range(4):
            inside = xy[b][t[b, k]]
            lo, hi = inside.min(0).values, inside.max(0).values
            strictly = ((xy[b] > lo + 1e-6) & (xy[b] < hi - 1e-6)).all(1)
            assert t[b, k][strictly].all()


def test_area_box_catching_nothing_falls_back_to_random():
    valid = lengths_mask([5], 8)
    xy = torch.full((1, 8, 2), 50.0)  # far outside any box
    t = area_targets(valid, xy, 4, 0.45, gen())
    assert (t.sum(-1) == 2).all()


def test_modality_targets_and_min_context():
    valid = lengths_mask([10, 6], 10)
    modality = torch.tensor([[1] * 6 + [2] * 4, [1] * 10])
    t = modality_targets(valid, modality, gen())
    assert t.shape == (2, 1, 10)
    first = t[0, 0]
    assert torch.equal(first, modality[0] == 2) or torch.equal(first, modality[0] == 1)
    # everything a target: the context gets a contiguous run back, removed from the targets
    targets = valid[:, None].expand(2, 3, 10).clone()
    context, targets = context_from_targets(valid, targets, 0.3, gen())
    assert context.sum(1).tolist() == [3, 2]
    idx = torch.nonzero(context[0]).flatten()
    assert (idx[1:] - idx[:-1] == 1).all() and not (targets.any(1) & context).any()


def test_sample_masks_follows_the_mix_and_centroids():
    valid = lengths_mask([12, 12], 12)
    pos = torch.rand(2, 12, 8, generator=gen(3))
    assert torch.allclose(min_box_centroid(pos), pos.reshape(2, 12, 4, 2).mean(2))
    seen = {sample_masks({"random": 0.5, "area": 0.5, "modality": 0.0}, valid, min_box_centroid(pos), valid.long(), 4, 0.45, 0.12, gen(s))[0]
            for s in range(20)}
    assert seen == {"random", "area"}
    strategy, context, targets = sample_masks({"random": 1.0}, valid, min_box_centroid(pos), valid.long(), 4, 0.45, 0.12, gen())
    assert strategy == "random" and context.shape == (2, 12) and targets.shape == (2, 4, 12)
    assert (context.sum(1) >= 2).all() and not (context & targets.any(1)).any()
