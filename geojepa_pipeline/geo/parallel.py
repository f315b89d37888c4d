"""Process and garbage-collector helpers shared by the CPU-heavy geo steps.

* ``gc_paused``: shapely geometries are GC-tracked objects, so building millions of them
  (tile pieces) keeps triggering full collections that walk every live object and find
  nothing: our geometry code makes no reference cycles. Measured on the 8x8 replicated
  Liechtenstein (1.77 M pieces): one band went from 1.45 s to 1.17 s, and the whole
  ingestion (``stages.osm.build_tile_shards``, as ``bench/ingest.py`` times it) from 15.7 s
  to 12.1 s, with the collector paused.
  Reference counting still frees everything as usual.
* ``default_workers`` / ``fork_worker_init``: forked process pools (bands, chips).
* ``fork_each``: a fresh forked process per job, a few at a time (block shares): a job's memory goes with
  its process, and a worker that dies is an error that names its job, not a hang.
"""

from __future__ import annotations

import gc
import os
import signal
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """Disable the cyclic collector inside the block; restore its previous state after (nests).

    Also a decorator (``@gc_paused()``). Forked worker processes started inside the block
    inherit the paused collector.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def default_workers() -> int:
    """Processes for a CPU-bound step: one per core, at most 2 (the memory budget of one machine)."""
    return max(1, min(2, os.cpu_count() or 1))


def fork_worker_init() -> None:
    """In a forked worker: default signal handlers (the parent's, e.g. Dagster's, must not run there)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Not here on purpose: splitting the UTM projection and the node lookup over two threads
# (both release the GIL) gained nothing measurable on the 8x8 Liechtenstein, and the
# threads' malloc arenas, inherited by the forked band workers, raised their peak RSS by
# 73 MiB.


def fork_each(fn, jobs: list, workers: int, name=repr):
    """Yield ``fn(job)`` for each of ``jobs``, in order, each computed in a fresh forked process, at most
    ``workers`` at once. A process that dies without a result (killed, out of memory, a crash in C) raises
    ``RuntimeError`` naming ``name(job)`` and its exit code; an exception in ``fn`` is raised here as is."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")

    def child(conn, job) -> None:
        fork_worker_init()
        try:
            conn.send((True, fn(job)))
        except BaseException as e:  # noqa: BLE001  (sent to the parent, raised there)
            try:
                conn.send((False, e))
            except Exception:  # an exception that does not pickle: its text
                conn.send((False, RuntimeError(f"{name(job)}: {type(e).__name__}: {e}")))
        finally:
            conn.close()

    done: dict[int, object] = {}
    running: dict = {}  # reading end -> (index, process)
    nxt = 0
    try:
        for want in range(len(jobs)):
            while want not in done:
                while nxt < len(jobs) and len(running) < max(1, workers):
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=child, args=(send, jobs[nxt]))  # not daemonic: a job may fork its own workers
                    proc.start()
                    send.close()
                    running[recv] = (nxt, proc)
                    nxt += 1
                for recv in wait(list(running)):
                    i, proc = running.pop(recv)
                    try:
                        ok, value = recv.recv()
                    except EOFError:
                        proc.join()
                        raise RuntimeError(f"the worker process for {name(jobs[i])} died (exit code {proc.exitcode}; "
                                           f"-9 is usually the out-of-memory killer)") from None
                    finally:
                        recv.close()
                    proc.join()
                    if not ok:
                        raise value
                    done[i] = value
            yield done.pop(want)
    finally:
        for recv, (_, proc) in running.items():
            proc.terminate()
            proc.join()
            recv.close()
