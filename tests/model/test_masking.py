"""Masking strategies (numpy, drawn in the loader): shapes, fractions, boxes, modalities, minimum context."""

from __future__ import annotations

import numpy as np

from geojepa_pipeline.model.masking import (
    area_targets, context_from_targets, min_box_centroid, modality_targets, random_targets, sample_masks,
)


def gen(seed=0):
    return np.random.default_rng(seed)


def lengths_mask(lengths, L):
    return np.arange(L)[None] < np.array(lengths)[:, None]


def test_random_targets_take_the_fraction_of_valid_tokens_only():
    valid = lengths_mask([20, 7, 1], 24)
    t = random_targets(valid, 4, 0.45, gen())
    assert t.shape == (3, 4, 24) and t.dtype == bool
    assert not (t & ~valid[:, None]).any()
    assert t.sum(-1)[0].tolist() == [9] * 4 and t.sum(-1)[1].tolist() == [3] * 4 and t.sum(-1)[2].tolist() == [1] * 4
    assert not np.array_equal(t[0, 0], t[0, 1])  # independent draws


def test_area_targets_use_centroids_inside_boxes():
    B, L = 2, 400
    valid = np.ones((B, L), bool)
    xy = gen(1).random((B, L, 2))
    t = area_targets(valid, xy, 4, 0.45, gen(2))
    frac = t.mean(-1)
    assert t.shape == (B, 4, L) and (frac > 0.15).all() and (frac < 0.75).all()
    # each target is an axis-aligned box: its tokens' bounding box holds no non-target token strictly inside
    for b in range(B):
        for k in range(4):
            inside = xy[b][t[b, k]]
            lo, hi = inside.min(0), inside.max(0)
            strictly = ((xy[b] > lo + 1e-6) & (xy[b] < hi - 1e-6)).all(1)
            assert t[b, k][strictly].all()


def test_area_box_catching_nothing_falls_back_to_random():
    valid = lengths_mask([5], 8)
    xy = np.full((1, 8, 2), 50.0)  # far outside any box
    t = area_targets(valid, xy, 4, 0.45, gen())
    assert (t.sum(-1) == 2).all()


def test_modality_targets_and_min_context():
    valid = lengths_mask([10, 6], 10)
    modality = np.array([[1] * 6 + [2] * 4, [1] * 10])
    t = modality_targets(valid, modality, gen())
    assert t.shape == (2, 1, 10)
    first = t[0, 0]
    assert np.array_equal(first, modality[0] == 2) or np.array_equal(first, modality[0] == 1)
    assert t[1, 0].sum() == 3 and not (t[1, 0] & ~valid[1]).any()  # one modality only: random targets instead
    # everything a target: the context gets a contiguous run back, removed from the targets
    targets = np.broadcast_to(valid[:, None], (2, 3, 10)).copy()
    context, targets = context_from_targets(valid, targets, 0.3, gen())
    assert context.sum(1).tolist() == [3, 2]
    for row in range(2):
        idx = np.flatnonzero(context[row])
        assert (np.diff(idx) == 1).all()
    assert not (targets.any(1) & context).any()
    # enough context already: nothing moves
    few = np.zeros((2, 3, 10), bool)
    few[:, 0, :2] = True
    context, same = context_from_targets(valid, few, 0.3, gen())
    assert np.array_equal(same, few) and np.array_equal(context, valid & ~few.any(1))


def test_sample_masks_follows_the_mix_and_centroids():
    valid = lengths_mask([12, 12], 12)
    pos = gen(3).random((2, 12, 8))
    assert np.allclose(min_box_centroid(pos), pos.reshape(2, 12, 4, 2).mean(2))
    seen = {sample_masks({"random": 0.5, "area": 0.5, "modality": 0.0}, valid, min_box_centroid(pos), valid.astype(int), 4, 0.45, 0.12, gen(s))[0]
            for s in range(20)}
    assert seen == {"random", "area"}
    strategy, context, targets = sample_masks({"random": 1.0}, valid, min_box_centroid(pos), valid.astype(int), 4, 0.45, 0.12, gen())
    assert strategy == "random" and context.shape == (2, 12) and targets.shape == (2, 4, 12)
    assert (context.sum(1) >= 2).all() and not (context & targets.any(1)).any()
    # modality masking keeps K targets (one real, the rest empty): the same shapes as the other strategies
    modality = np.array([[1] * 8 + [2] * 4] * 2)
    strategy, context, targets = sample_masks({"modality": 1.0}, valid, min_box_centroid(pos), modality, 4, 0.45, 0.12, gen())
    assert strategy == "modality" and targets.shape == (2, 4, 12) and targets[:, 0].any(1).all() and not targets[:, 1:].any()


def test_same_seed_same_masks():
    valid = lengths_mask([12, 7, 30], 32)
    pos = gen(4).random((3, 32, 8))
    mix = {"random": 0.3, "area": 0.7}
    a = sample_masks(mix, valid, min_box_centroid(pos), valid.astype(int), 4, 0.45, 0.12, gen(9))
    b = sample_masks(mix, valid, min_box_centroid(pos), valid.astype(int), 4, 0.45, 0.12, gen(9))
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
