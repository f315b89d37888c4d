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

Object storage: the root may be an fsspec URL (``GEOJEPA_STORE=s3://bucket/prefix``, opened
through universal-pathlib; ``AWS_ENDPOINT_URL`` points at an S3-compatible server). The bucket
is then the source of truth and the local root is a mirror of what this machine wrote or read
(``GEOJEPA_HOME/cache/store/...``). The same guarantees hold, built from atomic object PUTs: a
dataset's files are uploaded first and ``manifest.json`` last, so a prefix without a manifest is
not a dataset, and ``CURRENT`` is replaced only after the manifest is up. Readers fetch a
dataset into the mirror on first use (committed versions never change, so the mirror never
goes stale) and check every file against the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import GeojepaError

MANIFEST = "manifest.json"
GLOBAL_SCOPE = "@all"  # the "region" of datasets over all regions (e.g. the tag cache); not a valid region name
CURRENT = "CURRENT"
_STAGING_PREFIX = ".staging-"


# ---- the dataset layout: every kind of dataset, its scope, the asset that writes it, its files --------

OSM, TILES, SCENES, IMAGES = "osm", "tiles", "scenes", "images"
TAGS, GEOMETRY, TOKENS = "tag_embeddings", "geometry_encoder", "tokens"
CHECKPOINTS, REPORTS, EMBEDDINGS = "checkpoints", "reports", "embeddings"

REGION_SCOPE, VARIANT_SCOPE = "region", "variant"  # GLOBAL_SCOPE ("@all") is the third
REGION_VARIANT_SCOPE = "region.variant"  # a region's datasets made by one model variant: ``<region>.<variant>``

# named files (one per dataset version)
RELATION_MEMBERS_FILE = "relation_members.parquet"  # tiles: every kept relation's members (osm_read.RELATION_MEMBERS_SCHEMA)
SCENES_FILE = "scenes.json"  # scenes: what the version derives from (ids, checksums, chipping facts)
PAIRS_FILE, POLICY_FILE = "pairs.parquet", "policy.json"  # tag_embeddings: (key, value, vector) rows; open-key policy
WEIGHTS_FILE, CONFIG_FILE, HISTORY_FILE = "model.safetensors", "config.json", "history.json"  # geometry_encoder
INPUTS_FILE = "inputs.json"  # tokens, checkpoints: every input's data version
LAST_WEIGHTS_FILE, TRAIN_STATE_FILE = "last.safetensors", "train_state.json"  # checkpoints (best weights: WEIGHTS_FILE)
METRICS_FILE, REPORT_FILE, EMBEDDINGS_FILE = "metrics.json", "report.html", "embeddings.parquet"  # reports
TILE_EMBEDDINGS_FILE = "tile_embeddings.parquet"  # embeddings: GeoParquet, one row per tile (stages.embeddings)
TILE_INDEX_FILE = "index.faiss"  # embeddings past evaluate.index.EXACT_MAX tiles: their cosine kNN index


@dataclass(frozen=True)
class Kind:
    """One kind of dataset.

    ``name`` is its directory under the root; ``scope`` what its second path level names (a region,
    ``@all`` or a model variant); ``asset`` the Dagster asset that materializes it; ``files`` its named
    files; ``tables`` its sharded tables, each with the stem of its shard file names
    (``<stem>-00000.parquet``), listed per shard in the manifest under ``<table>_file``.
    """

    name: str
    scope: str
    asset: str
    files: tuple[str, ...] = ()
    tables: dict[str, str] = field(default_factory=dict)
    # besides these, a scenes version holds the rasters it stores, each named in manifest["scenes"] (Dataset.member)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(OSM, REGION_SCOPE, "osm_extract"),  # content-addressed: osm/<region>/<sha256>.osm.pbf, no version directories
    Kind(TILES, REGION_SCOPE, "tile_shards", (RELATION_MEMBERS_FILE,), {"tiles": "tiles", "entities": "entities"}),
    Kind(SCENES, REGION_SCOPE, "naip_scenes", (SCENES_FILE,)),
    Kind(IMAGES, REGION_SCOPE, "tile_images", (), {"images": "images"}),
    Kind(TAGS, GLOBAL_SCOPE, "tag_embeddings", (PAIRS_FILE, POLICY_FILE)),
    Kind(GEOMETRY, GLOBAL_SCOPE, "geometry_encoder", (WEIGHTS_FILE, CONFIG_FILE, HISTORY_FILE)),
    Kind(TOKENS, REGION_SCOPE, "tile_tokens", (INPUTS_FILE,), {"tokens": "tokens", "image_tokens": "image-tokens"}),
    Kind(CHECKPOINTS, VARIANT_SCOPE, "geojepa_checkpoint", (WEIGHTS_FILE, LAST_WEIGHTS_FILE, TRAIN_STATE_FILE, INPUTS_FILE)),
    Kind(REPORTS, VARIANT_SCOPE, "evaluation_report", (METRICS_FILE, REPORT_FILE, EMBEDDINGS_FILE)),
    Kind(EMBEDDINGS, REGION_VARIANT_SCOPE, "tile_embeddings", (TILE_EMBEDDINGS_FILE, TILE_INDEX_FILE)),
)}


def shard_filename(table: str, shard_index: int) -> str:
    """File name of one shard of a dataset table, e.g. ``entities-00003.parquet`` (``table``: a file stem)."""
    return f"{table}-{shard_index:05d}.parquet"


def _shard_key(table: str) -> str:
    return f"{table}_file"  # where a shard's manifest entry names the table's file


def _kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; the store knows {sorted(KINDS)}") from None


def _check_file(kind: str, name: str) -> str:
    if name not in _kind(kind).files:
        raise ValueError(f"{kind} datasets have no file {name!r}; their files are {list(_kind(kind).files)}")
    return name


def _shard_stem(kind: str, table: str) -> str:
    tables = _kind(kind).tables
    if table not in tables:
        raise ValueError(f"{kind} datasets have no sharded table {table!r}; their tables are {sorted(tables)}")
    return tables[table]


def scope_label(kind: str, scope: str) -> str:
    """How an error names a dataset's scope: ``region 'li'``, ``variant 'GT'`` or ``the store``."""
    s = _kind(kind).scope
    if s == REGION_VARIANT_SCOPE:
        region, _, variant = scope.rpartition(".")
        return f"region {region!r} by variant {variant}"
    return "the store" if s == GLOBAL_SCOPE else f"{s} {scope!r}"


def missing(kind: str, scope: str, asset: str | None = None) -> GeojepaError:
    """The one error for a dataset that is not there yet: what to materialize, and the command."""
    asset = asset or _kind(kind).asset
    if _kind(kind).scope == GLOBAL_SCOPE:
        return GeojepaError(f"the store has no {asset} yet; materialize {asset} first (geojepa materialize)")
    if _kind(kind).scope == REGION_VARIANT_SCOPE:
        region, _, variant = scope.rpartition(".")
        return GeojepaError(f"{scope_label(kind, scope)} has no {asset} yet; materialize {asset}[{region}|{variant}] first "
                            f"(geojepa materialize --select {asset} --region {region} --variant {variant})")
    flag = "--variant" if _kind(kind).scope == VARIANT_SCOPE else "--region"
    return GeojepaError(f"{scope_label(kind, scope)} has no {asset} yet; materialize {asset}[{scope}] first "
                        f"(geojepa materialize --select {asset} {flag} {scope})")


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_process_dirs(parent: Path, prefix: str) -> list[Path]:
    """The directories ``<prefix><pid>-*`` under ``parent`` whose process is gone (a killed writer's)."""
    found = []
    for path in parent.glob(prefix + "*") if parent.is_dir() else []:
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            found.append(path)
    return found


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

    def file(self, name: str) -> Path:
        """Path of one of the kind's named files (``KINDS[kind].files``)."""
        return self.path / _check_file(self.kind, name)

    @property
    def label(self) -> str:
        """How messages name this version: ``checkpoints/GT@0123456789abcdef``."""
        return f"{self.kind}/{self.region}@{self.data_version}"

    def verify(self, names: list[str] | None = None) -> list[str]:
        """Check files' bytes against the sha256 the manifest recorded at commit (default: every file).

        Returns one line per file that is missing or differs ([] when intact). Costs one read of
        the files: ``geojepa verify`` prints the rate.
        """
        files = self.manifest.get("files", {})
        problems = []
        for name in sorted(files if names is None else names):
            path = self.path / name
            if name not in files:
                problems.append(f"{self.label}: {name} is not in its manifest")
            elif not path.is_file():
                problems.append(f"{self.label}: {name} is missing")
            elif path.stat().st_size != files[name]["bytes"] or sha256_file(path) != files[name]["sha256"]:
                problems.append(f"{self.label}: {name} does not match the sha256 its manifest recorded")
        return problems

    def verified_file(self, name: str) -> Path:
        """``file(name)``, after checking its bytes against the manifest (for weights a model loads)."""
        path = self.file(name)
        if problems := self.verify([name]):
            kind = _kind(self.kind)
            asset = kind.asset if kind.scope == GLOBAL_SCOPE else f"{kind.asset}[{self.region}]"
            raise GeojepaError(f"{problems[0]}: it was changed after it was written; re-materialize {asset}")
        return path

    def has_file(self, name: str) -> bool:
        """Whether this version holds the named file (versions of older code may lack one)."""
        return _check_file(self.kind, name) in self.manifest.get("files", {})

    def member(self, name: str) -> Path:
        """Path of a file the dataset holds under a name its manifest gives (a stored scene raster)."""
        if name not in self.manifest.get("files", {}):
            raise FileNotFoundError(f"{self.kind} dataset {self.region}@{self.data_version} holds no file {name!r}")
        return self.path / name

    @property
    def shard_entries(self) -> list[dict]:
        """The manifest's entry of every shard (``Staging.shard_entry``), in shard order."""
        return self.manifest.get("shards", [])

    def shards(self, table: str) -> list[Path]:
        """Paths of one sharded table's files, in the manifest's shard order (a shard without one: None)."""
        _shard_stem(self.kind, table)
        key = _shard_key(table)
        return [self.path / s[key] if s.get(key) else None for s in self.shard_entries]


@dataclass
class Staging:
    """A dataset being written (``Store.writing``): its files go in ``path``; set ``manifest`` before the block ends."""

    kind: str
    scope: str
    path: Path
    manifest: dict | None = None
    dataset: Dataset | None = None  # the committed version, once the block has ended

    @property
    def scratch(self) -> Path:
        """Temporary files of the write (created here); removed before the commit."""
        scratch = Store.scratch_dir(self.path)
        scratch.mkdir(exist_ok=True)
        return scratch

    def file(self, name: str) -> Path:
        """Where one of the kind's named files goes."""
        return self.path / _check_file(self.kind, name)

    def shard_name(self, table: str, shard_index: int) -> str:
        """File name of one shard of ``table`` (what the manifest lists under ``<table>_file``)."""
        return shard_filename(_shard_stem(self.kind, table), shard_index)

    def shard(self, table: str, shard_index: int) -> Path:
        return self.path / self.shard_name(table, shard_index)

    def shard_entry(self, shard_index: int, files: dict[str, Path | None], **facts) -> dict:
        """One shard's manifest entry: its index, the file name of each table in ``files``, and ``facts``.

        ``files`` maps a table to its shard file: one of this dataset's (``shard``), or the shard of
        another dataset's table that this one lines up with (an images shard names its tiles shard).
        A table without a file in this shard is left out.
        """
        entry = {"index": shard_index, **facts}
        for table, path in files.items():
            if not any(table in k.tables for k in KINDS.values()):
                raise ValueError(f"no dataset kind has a sharded table {table!r}")
            if path is not None:
                entry[_shard_key(table)] = Path(path).name
        return entry


def aligned_shards(*tables: tuple[Dataset | None, str]) -> list[tuple[Path | None, ...]]:
    """Sharded tables of datasets made one from another, lined up shard by shard.

    ``tables``: (dataset, table) pairs; a pair whose dataset is None gives None in every shard.
    Returns one tuple per shard, the table files in the order of ``tables``. Raises the one
    error that names both datasets when they do not hold the same shard indices (one was built
    from another version of the other).
    """
    present = [(ds, t) for ds, t in tables if ds is not None]
    if not present:
        return []
    first = present[0][0]
    indices = [s["index"] for s in first.shard_entries]
    for ds, _ in present[1:]:
        if [s["index"] for s in ds.shard_entries] != indices:
            raise GeojepaError(
                f"{KINDS[ds.kind].asset}[{ds.region}]@{ds.data_version} does not line up with "
                f"{KINDS[first.kind].asset}[{first.region}]@{first.data_version} ({len(ds.shard_entries)} shards against "
                f"{len(indices)}); re-materialize {KINDS[ds.kind].asset}[{ds.region}]")
    columns = [ds.shards(t) if ds is not None else [None] * len(indices) for ds, t in tables]
    return list(zip(*columns, strict=True))


@dataclass
class Verified:
    """One dataset version checked by ``Store.verify_current``."""

    label: str  # kind/scope@version
    files: int
    bytes: int
    problems: list[str]  # [] when every file matches


def is_url(root) -> bool:
    return "://" in str(root)


class RemoteRoot:
    """An object-store prefix through universal-pathlib: put, get, read and list by relative key."""

    def __init__(self, url: str):
        from upath import UPath

        options = {"use_listings_cache": False}  # other machines write here: never trust a cached listing
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if url.startswith("s3://") and endpoint:
            options["endpoint_url"] = endpoint
        try:
            self.base = UPath(url.rstrip("/"), **options)
            self.fs = self.base.fs
        except (ImportError, ValueError) as exc:
            raise GeojepaError(f"cannot open store {url}: {exc}; install the filesystem package (s3fs for s3://)") from None
        self.url = url.rstrip("/")

    def key(self, rel: str) -> str:
        return f"{self.base.path.rstrip('/')}/{rel}"

    def _call(self, what: str, rel: str, fn, *args):
        """``fn(*args)``; a failure other than a missing object becomes one line naming the store and the settings."""
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:  # botocore/aiohttp errors differ by backend: report them alike
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise GeojepaError(
                f"object store {self.url} failed to {what} {rel!r} ({type(exc).__name__}: {reason}); "
                "check GEOJEPA_STORE, AWS_ENDPOINT_URL and the AWS credentials") from None

    def exists(self, rel: str) -> bool:
        return self._call("check", rel, self.fs.exists, self.key(rel))

    def read_text(self, rel: str) -> str | None:
        try:
            return self._call("read", rel, self.fs.cat_file, self.key(rel)).decode("utf-8")
        except FileNotFoundError:
            return None

    def put(self, local: Path, rel: str) -> None:
        """One PUT: the object appears whole or not at all."""
        self._call("upload", rel, self.fs.put_file, str(local), self.key(rel))

    def get(self, rel: str, local: Path) -> None:
        self._call("download", rel, self.fs.get_file, self.key(rel), str(local))

    def glob(self, pattern: str) -> list[str]:
        """Keys matching ``pattern`` (relative), returned relative to the root."""
        prefix = self.base.path.rstrip("/") + "/"
        return sorted(k[len(prefix):] for k in self._call("list", pattern, self.fs.glob, self.key(pattern)))


def mirror_dir(url: str, home: Path) -> Path:
    """Where the object-store root ``url`` is mirrored for GEOJEPA_HOME ``home``: ``home/cache/store/<scheme>/<bucket>/<prefix>``."""
    return Path(home) / "cache" / "store" / str(url).replace("://", "/").strip("/")


class Store:
    """Paths and atomic commits below one root: a directory, or an object-store URL mirrored locally."""

    def __init__(self, root: str | os.PathLike, cache: str | os.PathLike | None = None):
        if is_url(root):
            self.remote: RemoteRoot | None = RemoteRoot(str(root))
            self.uri = self.remote.url
            if cache is None:  # the settings' mirror, as default_store() would give
                from .settings import get_settings

                cache = mirror_dir(self.uri, get_settings().home)
            self.root = Path(cache)
        else:
            self.remote = None
            self.root = Path(root)
            self.uri = str(self.root)

    # ---- the remote mirror (no-ops for a local root) ----------------------------------------
    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def publish(self, path: Path, once: bool = False) -> None:
        """Upload one local file under the root to the same key (a no-op without a remote root).

        ``once``: skip the upload when the key exists (content-addressed files never change).
        """
        if self.remote is not None and not (once and self.remote.exists(self._rel(path))):
            self.remote.put(path, self._rel(path))

    def fetch(self, path: Path) -> Path:
        """``path``, downloaded from the remote root first when only the remote has it."""
        path = Path(path)
        if self.remote is None or path.exists():
            return path
        rel = self._rel(path)
        if self.remote.exists(rel):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                self.remote.get(rel, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def put_json(self, path: Path, obj: Any) -> None:
        """Write JSON atomically under the root, and publish it."""
        atomic_write_json(path, obj)
        self.publish(path)

    def _fetch_dataset(self, kind: str, region: str, data_version: str) -> None:
        """Download a committed remote dataset into the mirror: files, checked against the manifest, then rename."""
        rel = f"{kind}/{region}/{data_version}"
        text = self.remote.read_text(f"{rel}/{MANIFEST}")
        if text is None:
            return
        manifest = json.loads(text)
        parent = self.kind_dir(kind, region)
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, info in sorted(manifest.get("files", {}).items()):
                self.remote.get(f"{rel}/{name}", staging / name)
                if sha256_file(staging / name) != info["sha256"]:
                    raise GeojepaError(f"{self.uri}/{rel}/{name} does not match its manifest sha256; the object store copy is damaged")
            (staging / MANIFEST).write_text(text)
            final = parent / data_version
            if (final / MANIFEST).exists():
                return
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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

    def work_dir(self, kind: str, scope: str, key: str) -> Path:
        """A resumable work directory beside the scope's versions (``.work-<key>``: hidden, never a dataset)."""
        return self.kind_dir(kind, scope) / f".work-{key}"

    def dataset(self, kind: str, region: str, data_version: str) -> Dataset:
        path = self.kind_dir(kind, region) / data_version
        if not (path / MANIFEST).exists() and self.remote is not None:
            self._fetch_dataset(kind, region, data_version)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"no committed {kind} dataset {region}@{data_version} under {self.uri}")
        return Dataset(kind, region, data_version, path)

    def versions(self, kind: str, region: str) -> list[str]:
        """Committed data versions of one region (directories that hold a manifest)."""
        if self.remote is not None:
            found = self.remote.glob(f"{kind}/{region}/*/{MANIFEST}")
            return sorted(k.split("/")[2] for k in found if not k.split("/")[2].startswith("."))
        d = self.kind_dir(kind, region)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / MANIFEST).exists())

    def regions(self, kind: str) -> list[str]:
        """Regions that have a CURRENT pointer for ``kind``."""
        if self.remote is not None:
            return sorted(k.split("/")[1] for k in self.remote.glob(f"{kind}/*/{CURRENT}"))
        d = self.root / kind
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / CURRENT).exists())

    def current_version(self, kind: str, region: str) -> str | None:
        pointer = self.kind_dir(kind, region) / CURRENT
        if self.remote is not None:  # the bucket is the truth: another machine may have moved it
            text = self.remote.read_text(self._rel(pointer))
            return text.strip() if text else None
        return pointer.read_text().strip() if pointer.exists() else None

    def current(self, kind: str, region: str) -> Dataset | None:
        version = self.current_version(kind, region)
        return self.dataset(kind, region, version) if version else None

    def set_current(self, kind: str, region: str, data_version: str) -> None:
        pointer = self.kind_dir(kind, region) / CURRENT
        atomic_write_text(pointer, data_version + "\n")
        self.publish(pointer)

    def new_staging_dir(self, kind: str, region: str) -> Path:
        """A fresh hidden directory to write a dataset into; stale ones of dead processes go."""
        parent = self.kind_dir(kind, region)
        parent.mkdir(parents=True, exist_ok=True)
        for stale in dead_process_dirs(parent, _STAGING_PREFIX):
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
        if self.remote is not None and not self.remote.exists(f"{kind}/{region}/{data_version}/{MANIFEST}"):
            for name in files:  # data first, the manifest last: a prefix without one is not a dataset
                self.publish(final / name)
            self.publish(final / MANIFEST)
        return Dataset(kind, region, data_version, final)

    @contextmanager
    def writing(self, kind: str, scope: str, make_current: bool = True) -> Iterator[Staging]:
        """Write one new dataset version: ``with store.writing(TILES, region) as staging: ...``.

        The block writes into ``staging.path`` and sets ``staging.manifest``. When it ends normally the
        staging directory is committed (``commit``: named by its content) and becomes the scope's CURRENT
        version; ``staging.dataset`` is then the committed dataset. On any error, or without a
        manifest, nothing is committed and the staging directory goes. ``make_current=False``: commit
        only; the caller moves ``CURRENT`` (``set_current``) once the new version passed its checks.
        """
        staging = Staging(kind, scope, self.new_staging_dir(kind, scope))
        try:
            yield staging
            if staging.manifest is None:
                raise RuntimeError(f"writing {kind}/{scope}: the block ended without setting staging.manifest")
            shutil.rmtree(self.scratch_dir(staging.path), ignore_errors=True)
            staging.dataset = self.commit(kind, scope, staging.path, staging.manifest)
        except BaseException:
            self.discard_staging(staging.path)
            raise
        if make_current:
            self.set_current(kind, scope, staging.dataset.data_version)

    @contextmanager
    def exclusive(self, kind: str, scope: str, log=None) -> Iterator[None]:
        """Hold the one lock of ``kind/scope`` on this machine: concurrent runs that would build the same
        dataset take turns, and the later one finds the earlier one's result (and reuses it when its inputs are
        the same) instead of computing it a second time.

        An advisory ``flock`` on ``<kind>/<scope>/.lock``, released when the block ends or the process dies
        (a killed holder leaves nothing to clean up). ``log``: told once when the lock is held by another
        process, with its pid. With an object-store root the lock is this machine's mirror: it serialises the
        runs of one home, not of several machines.
        """
        import fcntl

        path = self.kind_dir(kind, scope) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                if log:
                    log(f"{_kind(kind).asset}[{scope}]: waiting for another run (pid {holder}) that is building it")
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def require(self, kind: str, scope: str, asset: str | None = None) -> Dataset:
        """The scope's CURRENT dataset of ``kind``, or the one error that says what to materialize first.

        ``asset``: the asset named in the error (default: the one that writes ``kind``).
        """
        ds = self.current(kind, scope)
        if ds is None:
            raise missing(kind, scope, asset)
        return ds

    def verify_current(self, region: str | None = None) -> list["Verified"]:
        """Check every CURRENT version byte for byte against its manifest, and each OSM extract against its sha256.

        ``region``: that region's datasets and extract only; default: every scope (regions, ``@all``, variants).
        """
        out = []
        for kind in KINDS.values():
            scopes = self.regions(kind.name)
            if region is not None:
                scopes = [region] if kind.scope == REGION_SCOPE else [s for s in scopes if kind.scope == REGION_VARIANT_SCOPE
                                                                      and s.rpartition(".")[0] == region]
            for scope in scopes:
                if kind.name == OSM:
                    sha = self.current_version(OSM, scope)
                    if sha is None:
                        continue
                    path = self.osm_extract_path(scope, sha)
                    problems = [] if path.is_file() and sha256_file(path) == sha else [f"{OSM}/{scope}@{sha[:16]}: the extract does not match its sha256"]
                    out.append(Verified(f"{OSM}/{scope}@{sha[:16]}", 1, path.stat().st_size if path.is_file() else 0, problems))
                    continue
                ds = self.current(kind.name, scope)
                if ds is not None:
                    files = ds.manifest.get("files", {})
                    out.append(Verified(ds.label, len(files), sum(f["bytes"] for f in files.values()), ds.verify()))
        return out

    def iter_current(self, kind: str) -> Iterator[Dataset]:
        for region in self.regions(kind):
            ds = self.current(kind, region)
            if ds is not None:
                yield ds


def default_store() -> Store:
    from .settings import get_settings

    settings = get_settings()
    return Store(settings.store_root, cache=settings.store_cache)

