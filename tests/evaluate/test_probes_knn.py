"""Probe machinery recovers a planted signal; the kNN metric is 1.0 for random embeddings."""

from __future__ import annotations

import numpy as np

from geojepa_pipeline.evaluate.knn import agreement_ratio, cosine_knn, numeric_ratio
from geojepa_pipeline.evaluate.probes import dummy_metric, train_probe


def split(n, seed=0):
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: int(0.6 * n)], idx[int(0.6 * n): int(0.8 * n)], idx[int(0.8 * n):]


def test_probes_recover_a_planted_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32))
    w = rng.normal(size=32)
    y = np.maximum(0, 10 + 3 * (x @ w) / np.sqrt(32) + rng.normal(0, 0.3, 3000))  # counts-like
    tr, va, te = split(3000)
    lin = train_probe("linear", "building_count", x[tr], y[tr], x[va], y[va], x[te], y[te], max_epochs=150)
    mlp = train_probe("mlp", "building_count", x[tr], y[tr], x[va], y[va], x[te], y[te], max_epochs=150)
    dummy = dummy_metric("building_count", y[tr], y[te])
    assert lin.mae < 0.5 * dummy and mlp.mae < 0.6 * dummy  # 1,800 tiles, 2 steps per epoch (batch 1024)
    yb = (x[:, 0] + x[:, 1] > 0).astype(float)
    clf = train_probe("linear", "bridge", x[tr], yb[tr], x[va], yb[va], x[te], yb[te], max_epochs=100)
    assert clf.mae < 0.25 and dummy_metric("bridge", yb[tr], yb[te]) > 0.4  # error rate: half of chance or better


def test_a_feature_absent_from_train_does_not_blow_up_the_probe():
    """tagcount's pair columns can be all zero in train and non-zero in test (a tag only test tiles have)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 8))
    y = np.maximum(0, 5 + 2 * x[:, 0] + rng.normal(0, 0.2, 600))
    tr, va, te = split(600)
    x = np.column_stack([x, np.zeros(600)])
    x[te, -1] = rng.integers(1, 4, len(te))  # the pair shows up only in test tiles
    mlp = train_probe("mlp", "building_count", x[tr], y[tr], x[va], y[va], x[te], y[te], max_epochs=100)
    assert mlp.mae < dummy_metric("building_count", y[tr], y[te])  # before the fix: MAE in the thousands


def test_knn_ratio_is_one_for_random_embeddings_and_below_for_informative_ones():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 50, 4000).astype(float)
    ratios = [numeric_ratio(labels, cosine_knn(rng.normal(size=(4000, 16)), 5), seed=s)[2] for s in range(3)]
    assert abs(np.mean(ratios) - 1.0) < 0.03
    informative = np.column_stack([labels, rng.normal(0, 0.5, (4000, 3))]) + 100  # the label dominates the direction
    assert numeric_ratio(labels, cosine_knn(informative, 5))[2] < 0.5
    classes = rng.integers(0, 4, 4000)
    agree = agreement_ratio(classes, cosine_knn(rng.normal(size=(4000, 8)), 5))[2]
    assert abs(agree - 1.0) < 0.08
    nn = cosine_knn(rng.normal(size=(50, 4)), 5)
    assert nn.shape == (50, 5) and not (nn == np.arange(50)[:, None]).any()  # never itself
