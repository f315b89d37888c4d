import os
import subprocess
import sys
import tempfile

ENV = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # numba's default: no cache dir set


def test_kernel_cache_falls_back_to_the_temp_dir_when_nothing_else_is_writable():
    code = ("import os; os.access = lambda *a, **k: False\n"
            "import numba\nfrom geojepa_pipeline.geo import jit\nprint(numba.config.CACHE_DIR)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV).stdout.strip()
    assert out.startswith(tempfile.gettempdir()) and "geojepa-numba-" in out


def test_kernel_cache_stays_beside_the_sources_when_writable():
    code = "import numba\nfrom geojepa_pipeline.geo import jit\nprint(repr(numba.config.CACHE_DIR))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV).stdout.strip()
    assert out == "''"
