import gc
import os

import pytest

from geojepa_pipeline.geo.parallel import fork_each, gc_paused


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


def _square_or_fail(job):
    import os
    import time

    x, action = job
    if action == "raise":
        raise ValueError(f"bad job {x}")
    if action == "die":
        os._exit(3)  # dies without a result, as the OOM killer or a C crash would leave it
    time.sleep(0.05 * (x % 3))  # finish out of order
    return x * x, os.getpid()


def test_fork_each_yields_in_order_each_job_in_its_own_process():
    out = list(fork_each(_square_or_fail, [(i, "ok") for i in range(7)], workers=2))
    assert [v for v, _ in out] == [i * i for i in range(7)]
    pids = {pid for _, pid in out}
    assert len(pids) == 7 and os.getpid() not in pids  # a fresh process per job


def test_fork_each_raises_the_jobs_exception_and_names_a_dead_worker():
    with pytest.raises(ValueError, match="bad job 2"):
        list(fork_each(_square_or_fail, [(1, "ok"), (2, "raise"), (3, "ok")], workers=2))
    with pytest.raises(RuntimeError, match=r"worker process for job-5 died \(exit code 3"):
        list(fork_each(_square_or_fail, [(4, "ok"), (5, "die")], workers=2, name=lambda job: f"job-{job[0]}"))


def _pool_of_two(n):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:  # as tile_osm forks its band workers
        return sum(pool.map(abs, range(-n, 0)))


def test_a_fork_each_job_may_fork_its_own_workers():
    assert list(fork_each(_pool_of_two, [3, 4], workers=2)) == [6, 10]
