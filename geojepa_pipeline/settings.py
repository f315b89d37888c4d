"""Where things live, read from the environment with sensible defaults.

``GEOJEPA_HOME`` (default ``./geojepa_home``) holds::

    regions.yaml   the region registry
    dagster/       DAGSTER_HOME (SQLite storage, run logs)
    mlflow/        the embedded MLflow store
    logs/          full logs of `geojepa materialize` runs (the terminal shows less)
    run/           the socket of `geojepa embed --serve` (the resident place-query server)
    store/         every materialized dataset, immutable per data version
    cache/store/   the local mirror when GEOJEPA_STORE is an object-store URL (s3://bucket/prefix)

Only this module reads the environment for locations; ``store.py`` builds every path below
``store/``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "geojepa_home"

# Telemetry off: these machines (and many clusters) have no internet.
_DAGSTER_YAML = """\
telemetry:
  enabled: false
# the daemon (geojepa ui) marks runs whose worker died as failed instead of leaving them STARTED
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


class Settings:
    """The locations under one GEOJEPA_HOME (``home``, absolute). A plain class, not a dataclass: ``cli_light``
    imports this module on every place query, and ``dataclasses`` (with ``inspect``) costs 5 ms of its ~40."""

    __slots__ = ("home",)

    def __init__(self, home: Path):
        object.__setattr__(self, "home", Path(home))

    def __setattr__(self, name, value):
        raise AttributeError("Settings is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, Settings) and other.home == self.home

    def __hash__(self) -> int:
        return hash(self.home)

    def __repr__(self) -> str:
        return f"Settings(home={self.home!r})"

    def __reduce__(self):
        return Settings, (self.home,)  # pickles (to worker processes) without __setattr__

    @property
    def registry_path(self) -> Path:
        return self.home / "regions.yaml"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def logs_dir(self) -> Path:
        """Full logs of CLI runs (``materialize-<time>-<pid>.log``), tracebacks included."""
        return self.home / "logs"

    @property
    def embed_socket(self) -> Path:
        """The Unix socket ``geojepa embed --serve`` listens on: ``run/embed.sock``, or, when that path is past the
        ~100 bytes a socket path may have, one in the temporary directory named by a hash of the home."""
        path = self.home / "run" / "embed.sock"
        if len(os.fsencode(path)) <= 100:
            return path
        import hashlib
        import tempfile

        return Path(tempfile.gettempdir()) / f"geojepa-embed-{hashlib.sha256(os.fsencode(self.home)).hexdigest()[:16]}.sock"

    @property
    def store_root(self) -> Path | str:
        """``GEOJEPA_STORE`` (a directory or an fsspec URL such as ``s3://bucket/prefix``), else ``home/store``."""
        root = os.environ.get("GEOJEPA_STORE")
        if not root:
            return self.home / "store"
        return root if "://" in root else Path(root)

    @property
    def store_cache(self) -> Path:
        """The local mirror of an object-store root (unused for a local root)."""
        from .store import mirror_dir

        return mirror_dir(str(self.store_root), self.home)


def get_settings(home: str | os.PathLike | None = None) -> Settings:
    """Settings for ``home``, else ``GEOJEPA_HOME``, else ``./geojepa_home``; made absolute so
    that Dagster subprocesses started from another directory agree with us."""
    home = Path(home or os.environ.get("GEOJEPA_HOME") or DEFAULT_HOME).expanduser().resolve()
    return Settings(home=home)


def ensure_dagster_home(settings: Settings | None = None) -> Path:
    """Create ``GEOJEPA_HOME/dagster`` with a ``dagster.yaml`` and export ``DAGSTER_HOME``."""
    settings = settings or get_settings()
    dagster_home = settings.dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text(_DAGSTER_YAML)
        os.replace(tmp, cfg)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["GEOJEPA_HOME"] = str(settings.home)
    return dagster_home
