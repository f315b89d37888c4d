"""The only module that knows storage paths.

Layout under the store root (``GEOJEPA_HOME/store`` by default)::

    osm/<region>/<sha256>.osm.pbf            content-addressed copies of the sources
    osm/<region>/<sha256>.source.json        the source's URI, size, mtime or ETag/Last-Modified at fetch time
    osm/<region>/CURRENT                     sha256 of the latest materialized extract
    <kind>/<region>/<data_version>/          one immutable directory per data version
        manifest.json                        written last: a directory without it is not a dataset
        tiles-00000.parquet ...
    <kind>/<region>/CURRENT                  the data version the latest materialization produced
    <kind>/@all/<data_version>/              datasets over all regions (tag_embeddings, geometry_encoder)

Writes are atomic: files are written to a temporary name and renamed; datasets are
written into a hidden staging directory (``.staging-<pid>-<uuid>``) that is renamed to its
data version in one step. A killed process leaves at most a hidden staging directory, which
no reader lists and the next write of the same region removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
GLOBAL_SCOPE = "@all"  # the "region" of datasets over all regions (e.g. the tag cache); not a valid region name
CURRENT = "CURRENT"
_STAGING_PREFIX = ".staging-"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Dataset:
    """One committed, immutable dataset version."""

    kind: str
    region: str
    data_version: str
    path: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())


class Store:
    """Paths and atomic commits below one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- sources -------------------------------------------------------------------------
    def osm_extract_path(self, region: str, sha256: str) -> Path:
        return self.root / "osm" / region / f"{sha256}.osm.pbf"

    def osm_source_stamp_path(self, region: str, sha256: str) -> Path:
        """How the source looked when the extract ``sha256`` was last fetched (JSON; see ``ingest``)."""
        return self.root / "osm" / region / f"{sha256}.source.json"

    def download_tmp_path(self, region: str) -> Path:
        """A private temporary file next to the final location, so the final rename is atomic."""
        d = self.root / "osm" / region
        d.mkdir(parents=True, exist_ok=True)
        return d / f".download-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"

    # ---- versioned datasets --------------------------------------------------------------
    def kind_dir(self, kind: str, region: str) -> Path:
        return self.root / kind / region

    def dataset(self, kind: str, region: str, data_version: str) -> Dataset:
        path = self.kind_dir(kind, region) / data_version
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"no committed {kind} dataset {region}@{data_version} under {path}")
        return Dataset(kind, region, data_version, path)

    def versions(self, kind: str, region: str) -> list[str]:
        """Committed data versions of one region (directories that hold a manifest)."""
        d = self.kind_dir(kind, region)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / MANIFEST).exists())

    def regions(self, kind: str) -> list[str]:
        """Regions that have a CURRENT pointer for ``kind``."""
        d = self.root / kind
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / CURRENT).exists())

    def current_version(self, kind: str, region: str) -> str | None:
        pointer = self.kind_dir(kind, region) / CURRENT
        return pointer.read_text().strip() if pointer.exists() else None

    def current(self, kind: str, region: str) -> Dataset | None:
        version = self.current_version(kind, region)
        return self.dataset(kind, region, version) if version else None

    def set_current(self, kind: str, region: str, data_version: str) -> None:
        atomic_write_text(self.kind_dir(kind, region) / CURRENT, data_version + "\n")

    def new_staging_dir(self, kind: str, region: str) -> Path:
        """A fresh hidden directory to write a dataset into; stale ones of dead processes go."""
        parent = self.kind_dir(kind, region)
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(_STAGING_PREFIX + "*"):
            try:
                pid = int(stale.name[len(_STAGING_PREFIX):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return staging

    @staticmethod
    def scratch_dir(staging: Path) -> Path:
        """Temporary files of a write in progress; removed before the staging directory is committed."""
        return staging / "_scratch"

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, kind: str, region: str, staging: Path, manifest: dict) -> Dataset:
        """Turn a staging directory into an immutable dataset named by its content.

        The data version is the first 16 hex digits of a sha256 over the names and sha256s of
        every file in ``staging``, ``manifest["schema_version"]`` and ``manifest["inputs"]`` (the
        data versions it was made from): equal bytes made from different inputs are two versions,
        so a manifest never claims inputs it was not made from. ``manifest.json`` is
        written last, then the directory is renamed in one step. If that version already
        exists (an unchanged re-run), the staging copy is dropped and the existing one kept.
        """
        files = {}
        for p in sorted(staging.iterdir()):
            if p.name == MANIFEST:
                continue
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        digest = hashlib.sha256()
        digest.update(f"{kind}:{manifest.get('schema_version')}\n".encode())
        if manifest.get("inputs") is not None:
            digest.update(f"inputs:{json.dumps(manifest['inputs'], sort_keys=True)}\n".encode())
        for name, info in files.items():
            digest.update(f"{name}:{info['sha256']}\n".encode())
        data_version = digest.hexdigest()[:16]
        manifest = {**manifest, "kind": kind, "region": region, "data_version": data_version, "files": files}
        atomic_write_json(staging / MANIFEST, manifest)
        final = self.kind_dir(kind, region) / data_version
        if (final / MANIFEST).exists():
            self.discard_staging(staging)
        else:
            if final.exists():  # a directory without a manifest is garbage from an old crash
                shutil.rmtree(final)
            os.rename(staging, final)
        return Dataset(kind, region, data_version, final)

    def iter_current(self, kind: str) -> Iterator[Dataset]:
        for region in self.regions(kind):
            ds = self.current(kind, region)
            if ds is not None:
                yield ds


def default_store() -> Store:
    from .settings import get_settings

    return Store(get_settings().store_root)


def shard_filename(table: str, shard_index: int) -> str:
    """File name of one shard of a dataset table, e.g. ``entities-00003.parquet``."""
    return f"{table}-{shard_index:05d}.parquet"
