"""Process and garbage-collector helpers shared by the CPU-heavy geo steps.

* ``gc_paused``: shapely geometries are GC-tracked objects, so building millions of them
  (tile pieces) keeps triggering full collections that walk every live object and find
  nothing: our geometry code makes no reference cycles. Measured on the 8x8 replicated
  Liechtenstein (1.77 M pieces): one band went from 1.45 s to 1.17 s, and the whole
  ingestion (``stages.osm.build_tile_shards``, as ``bench/ingest.py`` times it) from 15.7 s
  to 12.1 s, with the collector paused.
  Reference counting still frees everything as usual.
* ``default_workers`` / ``fork_worker_init``: forked process pools (bands, chips).
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
