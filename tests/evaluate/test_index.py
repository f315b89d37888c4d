"""CosineIndex: exact below the threshold; fast-scan PQ + exact re-rank above, checked against exact search."""

import numpy as np

from geojepa_pipeline.evaluate.index import CosineIndex


def _exact(x, q, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1)[:, :k]


def test_exact_path_matches_brute_force():
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((500, 32)), rng.standard_normal((20, 32))
    index = CosineIndex(x)
    assert index.kind == "exact" and len(index) == 500
    scores, idx = index.search(q, 5)
    assert (idx == _exact(x, q, 5)).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all() and np.abs(scores).max() <= 1 + 1e-5  # cosines, best first


def test_compressed_scan_with_rerank_recalls_the_exact_neighbours():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30_000, 64)).astype(np.float32)  # unclustered: the hard case for partitioned indexes
    q = rng.standard_normal((50, 64)).astype(np.float32)
    index = CosineIndex(x, exact_max=0)
    assert index.kind == "PQ32x4fs,RFlat"
    scores, idx = index.search(q, 5)
    truth = _exact(x, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, truth)])
    assert recall >= 0.95
    # re-ranked scores are the exact cosines of the returned rows
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    assert np.allclose(scores, np.einsum("qd,qkd->qk", qn, xn[idx]), atol=1e-4)
    # with almost no re-ranking the compressed scores alone miss neighbours: the re-rank is doing work
    weak = CosineIndex(x, exact_max=0, k_factor=1)
    weak_recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(weak.search(q, 5)[1], truth)])
    assert weak_recall < recall


def test_odd_dimensions_fall_back_to_exact():
    x = np.random.default_rng(2).standard_normal((300, 7))
    assert CosineIndex(x, exact_max=0).kind == "exact"
