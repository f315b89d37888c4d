import gc

import numpy as np

from geojepa_pipeline.geo.parallel import MIN_THREADED_ROWS, gc_paused, in_threads


def test_in_threads_matches_one_call():
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10**9, 50_000, replace=False))
    queries = rng.integers(0, 10**9, MIN_THREADED_ROWS * 3 + 7)
    one = np.searchsorted(ids, queries)
    assert np.array_equal(in_threads(lambda q: np.searchsorted(ids, q), queries, threads=3), one)
    x, y = in_threads(lambda a, b: (a + b, a * 2), queries, queries, threads=2)
    assert np.array_equal(x, queries * 2) and np.array_equal(y, queries * 2)
    assert np.array_equal(in_threads(lambda q: q + 1, queries[:10], threads=2), queries[:10] + 1)


def test_gc_paused_nests_and_restores():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with gc_paused():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.isenabled()
