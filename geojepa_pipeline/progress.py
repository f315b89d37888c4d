"""Throttled progress lines for long steps (downloads, ingestion, training)."""

from __future__ import annotations

import logging
import time
from typing import Callable

logger = logging.getLogger("geojepa")


class Progress:
    """Call ``update(done)``; a line goes to ``log`` at most every ``every_s`` seconds and at the end.

    ``unit`` scales the numbers for display (e.g. ``unit=2**20`` with ``unit_name='MiB'``).
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        log: Callable[[str], None] | None = None,
        every_s: float = 2.0,
        unit: float = 1.0,
        unit_name: str = "",
    ):
        self.label, self.total, self.every_s = label, total, every_s
        self.log = log or logger.info
        self.unit, self.unit_name = unit, unit_name
        self.start = self.last = time.monotonic()
        self.done = 0.0

    def _fmt(self, v: float) -> str:
        v = v / self.unit
        return f"{v:,.1f}{self.unit_name}" if self.unit != 1 else f"{v:,.0f}{self.unit_name}"

    def update(self, done: float, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        if self.total:
            pct = 100.0 * done / self.total
            self.log(f"{self.label}: {self._fmt(done)} / {self._fmt(self.total)} ({pct:.0f}%, {elapsed:.1f} s)")
        else:
            self.log(f"{self.label}: {self._fmt(done)} ({elapsed:.1f} s)")

    def finish(self) -> None:
        self.update(self.done, force=True)
