"""Memory of a process tree over time, sampled from /proc (Linux): what ``bench/ingest.py`` reports as the peak.

``ru_maxrss`` of a process and of its largest child can only bound the memory in use at once from above (the
two peaks need not coincide, and a forked child's RSS counts the pages it shares with its parent). This
sampler adds up the PSS (proportional set size: a shared page counts once, split between its users) of the
process and all its descendants every ``interval_s`` (0.5 s), and keeps the largest sum. Reading
``smaps_rollup`` walks every mapping of a process: at 0.1 s it took about 16 % of a core beside a 1.3 GB
``geojepa materialize`` (``top``), CPU the measured work then lacks on 2 cores.

    with TreeMemory() as mem:
        work()
    mem.peak_mb, mem.peak_rss_main_mb, mem.trace  # trace: [(seconds, tree PSS MB, main RSS MB, processes)]
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _kb(pid: int, field: str) -> int:
    """One ``field`` of /proc/<pid>/smaps_rollup in kB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples this process' tree (module docstring) on a daemon thread while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.5, pid: int | None = None):
        self.interval_s, self.pid = interval_s, pid or os.getpid()
        self.trace: list[tuple[float, float, float, int]] = []
        self.peak_mb = self.peak_rss_main_mb = 0.0
        self._stop = threading.Event()

    def sample(self) -> None:
        pids = _tree(self.pid)
        tree = sum(_kb(p, "Pss") for p in pids) / 1024.0
        main = _kb(self.pid, "Rss") / 1024.0
        self.trace.append((time.perf_counter() - self._t0, round(tree, 1), round(main, 1), len(pids)))
        self.peak_mb, self.peak_rss_main_mb = max(self.peak_mb, tree), max(self.peak_rss_main_mb, main)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "TreeMemory":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def at(self, seconds: float) -> float:
        """The tree's PSS (MB) of the last sample at or before ``seconds``."""
        before = [s for s in self.trace if s[0] <= seconds]
        return before[-1][1] if before else 0.0
