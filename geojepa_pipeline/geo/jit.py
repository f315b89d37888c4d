"""The numba decorator of the geo kernels, with an on-disk cache that always has a home.

numba caches compiled kernels beside their sources (``geo/__pycache__``), else under the
user's cache directory; when neither is writable (a read-only install run by a user without
a home) it refuses to import the module. Then the cache goes to the temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba

_PYCACHE = Path(__file__).resolve().parent / "__pycache__"
if not numba.config.CACHE_DIR and not os.access(_PYCACHE if _PYCACHE.exists() else _PYCACHE.parent, os.W_OK):
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if not os.access(home_cache if home_cache.exists() else home_cache.parent, os.W_OK):
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"geojepa-numba-{os.getuid()}")

kernel = numba.njit(cache=True, nogil=True)
"""``@kernel``: compiled on first call (cached on disk), releases the GIL."""
