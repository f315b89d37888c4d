"""Region ingestion without Dagster: fetch the OSM extract, tile it, write the shards.

The Dagster assets ``osm_extract`` and ``tile_shards`` are thin wrappers around
``fetch_extract`` and ``build_tile_shards``; a notebook or a test can call these directly.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from ..geo.clip import ClipArea, clip_osm
from ..geo.blocks import PlannedBlocks, log_plan, merge_shares, plan_blocks, share_dir, shares_tiled, tile_share
from ..geo.osm_read import PbfSummary, check_pbf_header, read_osm, validate_pbf
from ..geo.shards import DEFAULT_SHARD_TILES, invalid_pieces, write_tile_shards
from ..geo.parallel import default_workers
from ..geo.tiling import ENTITIES_SCHEMA, TILE_SIZE_M, TILES_SCHEMA, TiledRegion, tile_osm
from ..errors import GeojepaError
from ..regions import Region
from .sources import fetch_osm_source, local_source_path, source_fingerprint
from ..store import OSM, RELATION_MEMBERS_FILE, TILES, Dataset, Store, aligned_shards, dead_process_dirs, missing, sha256_file
from ..tables import count_distinct_entities

Log = Callable[[str], None]


@dataclass
class ExtractResult:
    region: str
    uri: str
    path: Path
    sha256: str
    bytes: int
    reused: bool
    summary: PbfSummary


def fetch_extract(region: Region, store: Store, log: Log | None = None) -> ExtractResult:
    """Copy/download the region's pbf into the store, validated, and point ``osm/<region>/CURRENT`` at it."""
    summaries: list[PbfSummary] = []
    validate = lambda path, label: summaries.append(validate_pbf(path, label))  # noqa: E731
    fetched = fetch_osm_source(region.osm, store, region.name, log=log, validate=validate)
    # a reused copy was validated when first stored; read its header facts once more
    summary = summaries[0] if summaries else validate_pbf(fetched.path)
    store.publish(fetched.path, once=True)  # content-addressed: uploaded once
    store.put_json(store.osm_source_stamp_path(region.name, fetched.sha256), fetched.stamp)
    store.set_current(OSM, region.name, fetched.sha256)
    return ExtractResult(region.name, region.osm, fetched.path, fetched.sha256, fetched.bytes, fetched.reused, summary)


def current_extract(store: Store, region: str) -> tuple[Path, str]:
    """(path, sha256) of the region's latest materialized extract."""
    sha = store.current_version(OSM, region)
    if sha is None or not store.fetch(store.osm_extract_path(region, sha)).exists():
        raise missing(OSM, region)
    return store.osm_extract_path(region, sha), sha


@dataclass(frozen=True)
class SourceCheck:
    """Whether a region's OSM source differs from the extract it was last ingested from."""

    region: str
    changed: bool
    reason: str  # one line for logs and run tags
    fingerprint: dict  # what ``source_fingerprint`` saw now (cached by the sensor's cursor)
    sha256: str | None  # content hash, when this check computed one (local files whose stat changed)
    never_ingested: bool = False  # no extract yet: the first ingestion is the user's or the schedule's call


def source_stamp(store: Store, region: str, sha256: str | None) -> dict | None:
    """The stamp recorded when the extract ``sha256`` of ``region`` was fetched, or None."""
    import json

    path = store.fetch(store.osm_source_stamp_path(region, sha256)) if sha256 else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def current_source_stamp(store: Store, region: str) -> dict | None:
    """The stamp recorded when the region's current extract was fetched, or None."""
    return source_stamp(store, region, store.current_version(OSM, region))


def check_source(region: Region, store: Store, cached: dict | None = None) -> SourceCheck:
    """Compare the region's OSM source now with the stamp of its current extract.

    Local files: equal size and mtime mean unchanged; otherwise the file is hashed and only a
    different sha256 counts as a change (a ``touch`` is not one). ``cached`` (a previous
    check's ``fingerprint`` and ``sha256``) saves hashing the same file again. http(s): a HEAD
    request; the ETag decides, else Last-Modified; a server that sends neither is reported as
    unchanged with that reason (the region's schedule still re-fetches it). Raises
    ``GeojepaError`` when the source cannot be reached.
    """
    name, current = region.name, store.current_version(OSM, region.name)
    fingerprint = source_fingerprint(region.osm)
    if current is None:
        return SourceCheck(name, True, "never ingested", fingerprint, None, never_ingested=True)
    stamp = current_source_stamp(store, name) or {}
    if stamp.get("uri", region.osm) != region.osm:
        return SourceCheck(name, True, f"source changed in the registry ({stamp.get('uri')} -> {region.osm})", fingerprint, None)
    path = local_source_path(region.osm)
    if path is not None:
        if stamp and (stamp.get("size"), stamp.get("mtime_ns")) == (fingerprint["size"], fingerprint["mtime_ns"]):
            return SourceCheck(name, False, "unchanged (same size and mtime)", fingerprint, current)
        if cached and cached.get("fingerprint") == fingerprint and cached.get("sha256"):
            sha = cached["sha256"]
        else:
            sha = sha256_file(path)
        if sha == current:
            return SourceCheck(name, False, "unchanged (mtime changed, same sha256)", fingerprint, sha)
        return SourceCheck(name, True, f"content changed (sha256 {current[:12]} -> {sha[:12]})", fingerprint, sha)
    for validator, label in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if fingerprint.get(validator) and stamp.get(validator):
            if fingerprint[validator] == stamp[validator]:
                return SourceCheck(name, False, f"unchanged (same {label})", fingerprint, None)
            return SourceCheck(name, True, f"{label} changed ({stamp[validator]} -> {fingerprint[validator]})", fingerprint, None)
    return SourceCheck(name, False, "unknown: the server sends no ETag or Last-Modified; the schedule re-fetches it",
                       fingerprint, None)


@dataclass(frozen=True)
class ShardCheck:
    """One check of a new tile_shards version: the asset check's name, whether it passed, facts for the UI."""

    name: str
    passed: bool
    metadata: dict


@dataclass
class TileShardsResult:
    dataset: Dataset
    tiled: TiledRegion
    manifest: dict
    timings_s: dict = field(default_factory=dict)
    checks: list[ShardCheck] = field(default_factory=list)
    current: str | None = None  # the region's CURRENT version afterwards: ``dataset``'s unless a check failed

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


def _schema_check(dataset: Dataset) -> ShardCheck:
    problems = []
    for tiles_path, entities_path in aligned_shards((dataset, "tiles"), (dataset, "entities")):
        if not pq.read_schema(tiles_path).remove_metadata().equals(TILES_SCHEMA):
            problems.append(f"{tiles_path.name}: schema differs")
        ents = pq.read_schema(entities_path)
        if not ents.remove_metadata().equals(ENTITIES_SCHEMA):
            problems.append(f"{entities_path.name}: schema differs")
        if b"geo" not in (ents.metadata or {}):
            problems.append(f"{entities_path.name}: no GeoParquet metadata")
    return ShardCheck("schema", not problems, {"n_shards": len(dataset.shard_entries), "problems": problems[:20]})


def _accounting_check(dataset: Dataset, tiled: TiledRegion) -> ShardCheck:
    acc = tiled.accounting()
    written = count_distinct_entities(dataset)
    dropped = sum(acc["dropped"].values())
    return ShardCheck("entity_accounting", acc["balanced"] and written == acc["n_entities_kept"], {
        "n_input": acc["n_input"], "n_in_tiles": written, "n_dropped": dropped,
        "dropped_by_reason": acc["dropped"], "repaired_by_reason": acc["repaired"],
        "equation": f"{acc['n_input']} = {written} in tiles + {dropped} dropped",
    })


def _area_check(tiled: TiledRegion) -> ShardCheck:
    return ShardCheck("clipped_area", tiled.area_check["n_over_tolerance"] == 0, dict(tiled.area_check))


def _validity_check(dataset: Dataset) -> ShardCheck:
    found = invalid_pieces(dataset.shards("entities"), workers=default_workers())
    return ShardCheck("valid_geometry", found["n_invalid"] == 0, found)


def shard_checks(dataset: Dataset, tiled: TiledRegion) -> list[ShardCheck]:
    """The checks a new tile_shards version must pass to become CURRENT (the asset's blocking checks):
    schema, entity accounting, clipped area, and GEOS validity of every piece as written."""
    return [_schema_check(dataset), _accounting_check(dataset, tiled), _area_check(tiled), _validity_check(dataset)]


@dataclass
class TileShardsOptions:
    """How tile_shards cuts and writes a region (``build_tile_shards``; the asset's config)."""

    shard_tiles: int = DEFAULT_SHARD_TILES  # tiles per Parquet shard
    tile_size_m: float = TILE_SIZE_M  # grid spacing in metres (the method uses 300)
    workers: int = 0  # processes for tiling (by blocks: blocks tiled at once); 0 = one per core, at most 2 (the output does not depend on it)
    # extracts of at least this many MiB are ingested block by block (geo.blocks: the same shards); 0: always,
    # a negative number: never. A whole-file read peaks at about 0.4 GB + 40 MB per MiB of pbf (1.6 GB at
    # 29 MiB, 5.1 GB at 118 MiB: bench/ingest.py --n 8/16 --blocks 128), so past 32 MiB it would pass 2 GB;
    # below, the whole file is faster (1.45x less wall time at 29 MiB).
    block_min_mb: float = 32.0
    block_tiles: int = 128  # a block's side in tiles (128: 38.4 km); a multiple of 16


WHOLE = -1  # the one unit of a build that reads the whole file at once


@dataclass(frozen=True)
class WholeResult:
    """What tiling the whole file gave (``tile_unit`` of ``WHOLE``): pieces spilled under the build's work."""

    tiled: TiledRegion
    members: pa.Table
    read_s: float


@dataclass(frozen=True)
class ShardsPlan:
    """One tile_shards build, planned (``plan_tile_shards``): picklable, so that each unit can run in its own
    process or pod (the Dagster fan-out), and the build can be committed from their results.

    ``work``: the build's scratch directory beside the region's versions (``store.work_dir``): the spilled
    file, each block's share and the units' pieces; it goes when the build is committed. ``blocks``: None
    for a whole-file build (one unit, ``WHOLE``)."""

    region: str
    work: Path
    extract_path: Path
    source: dict
    options: TileShardsOptions
    clip: ClipArea | None
    blocks: PlannedBlocks | None

    @property
    def units(self) -> tuple[int, ...]:
        """What to tile, in order: every share of the blocks (block ``k``, then the entities in no block), or ``WHOLE``."""
        return self.blocks.todo if self.blocks is not None else (WHOLE,)

    def unit_key(self, unit: int) -> str:
        """The unit's name for logs and Dagster (``[A-Za-z0-9_]``): ``whole``, ``block_00012``, ``nowhere``."""
        return "whole" if unit == WHOLE else self.blocks.layout.label(unit)

    def unit_dir(self, unit: int) -> Path:
        return self.work / "whole" if unit == WHOLE else share_dir(self.work, unit)


_STALE_WORK_DAYS = 3  # a failed Dagster build's work is kept this long for Dagster's re-execution from failure


def _clear_stale_work(store: Store, region: str, log: Log | None) -> None:
    """Remove the work of builds that cannot go on: a dead process' (``.work-shards-pid-<pid>-*``), or a
    Dagster run's (``.work-shards-run-*``) older than ``_STALE_WORK_DAYS``."""
    parent = store.kind_dir(TILES, region)
    stale = [(d, "its process is gone") for d in dead_process_dirs(parent, ".work-shards-pid-")]
    for run_work in parent.glob(".work-shards-run-*") if parent.is_dir() else []:
        age_days = (time.time() - run_work.stat().st_mtime) / 86400
        if age_days > _STALE_WORK_DAYS:
            stale.append((run_work, f"its run failed {age_days:.0f} days ago"))
    for old, why in stale:
        shutil.rmtree(old, ignore_errors=True)
        if log:
            log(f"removed {old.name}: {why}")


def plan_tile_shards(region: str, store: Store, extract_path: Path | None = None, source: dict | None = None,
                     log: Log | None = None, clip: ClipArea | None = None, run_id: str | None = None,
                     **options) -> ShardsPlan:
    """Decide how the region's extract is cut (whole file, or block by block past ``block_min_mb``) and, by
    blocks, spill it and write every block's share under a fresh work directory. ``options``: fields of
    ``TileShardsOptions``. ``run_id``: the Dagster run that owns the build (its work outlives this process,
    for the units' steps); None: this process owns it."""
    opts = TileShardsOptions(**options)
    if extract_path is None:
        extract_path, sha = current_extract(store, region)
        source = {**(source or {}), "sha256": sha}
    _clear_stale_work(store, region, log)
    owner = f"run-{run_id[:8]}" if run_id else f"pid-{os.getpid()}"
    work = store.work_dir(TILES, region, f"shards-{owner}-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    size_mb = Path(extract_path).stat().st_size / 2**20
    blocks = None
    try:
        if opts.block_min_mb >= 0 and size_mb >= opts.block_min_mb:
            if log:
                log(f"{Path(extract_path).name}: {size_mb:,.0f} MiB >= block_min_mb {opts.block_min_mb:g}: ingested block by block")
            check_pbf_header(extract_path)
            blocks = plan_blocks(extract_path, work, opts.block_tiles, opts.tile_size_m, clip=clip)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ShardsPlan(region, work, Path(extract_path), dict(source or {}), opts, clip, blocks)


def tile_unit(plan: ShardsPlan, unit: int, workers: int | None = None, log: Log | None = None, own_process: bool = False):
    """Tile one unit of ``plan``: a ``WholeResult``, or the ``ShareResult`` of block share ``unit``. Its pieces go
    under ``plan.unit_dir(unit)``, emptied first (a retried unit starts clean). ``workers``: tiling processes.
    ``own_process``: tile a block share in a fresh forked process, so that what it leaves in the heap (and its
    DuckDB reader) goes with it: for a caller that tiles many blocks in one long-lived process, as
    ``geojepa materialize`` does."""
    where = plan.unit_dir(unit)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    workers = workers or default_workers()
    opts, clip = plan.options, plan.clip
    if unit != WHOLE and own_process:
        from ..geo import minbox, wkb
        from ..geo.parallel import fork_each

        minbox.warm_up()  # loaded once here, inherited by each block's process
        wkb.warm_up()
        args = (plan.blocks.layout, unit, plan.region, where, clip, workers)
        return next(fork_each(lambda a: tile_share(*a), [args], 1, name=lambda a: plan.unit_key(a[1])))
    if unit != WHOLE:
        return tile_share(plan.blocks.layout, unit, plan.region, where, clip, workers)
    t0 = time.perf_counter()
    data = read_osm(plan.extract_path, log=log)
    if clip is not None:
        n_read = len(data)
        data = clip_osm(data, clip, opts.tile_size_m)
        if log:
            log(f"clip {clip.source}: {len(data):,} of {n_read:,} entities can reach it")
    read_s = time.perf_counter() - t0
    tiled = tile_osm(data, plan.region, tile_size_m=opts.tile_size_m, log=log, workers=workers, spill_dir=where, clip=clip)
    return WholeResult(tiled, data.relation_members(), read_s)


def commit_tile_shards(plan: ShardsPlan, store: Store, results, log: Log | None = None,
                       started: float | None = None) -> TileShardsResult:
    """Merge the units' results (``tile_unit`` of each of ``plan.units``, any order), write the shards into an
    immutable ``tiles/<region>/<data_version>``, run ``shard_checks`` and move ``CURRENT`` if they pass
    (``build_tile_shards``). The work directory goes once the version is committed."""
    if not plan.work.is_dir():
        raise GeojepaError(f"tile_shards[{plan.region}]: the work of this build ({plan.work}) is gone (older than "
                           f"{_STALE_WORK_DAYS} days, or removed); materialize tile_shards[{plan.region}] again")
    region, opts = plan.region, plan.options
    t_read = 0.0
    if plan.blocks is not None:
        tiled, members = merge_shares(plan.blocks, results, clip=plan.clip, log=log, started=started)
    else:
        (whole,) = list(results)
        tiled, members, t_read = whole.tiled, whole.members, whole.read_s
    with store.writing(TILES, region, make_current=False) as staging:
        t1 = time.perf_counter()
        manifest = write_tile_shards(tiled, staging, shard_tiles=opts.shard_tiles, log=log)
        pq.write_table(members, staging.file(RELATION_MEMBERS_FILE), compression="zstd")
        manifest["source"] = plan.source
        if plan.clip is not None:
            manifest["clip"] = plan.clip.describe()
        if plan.blocks is not None:
            manifest["ingestion"] = {"by_blocks": True, "block_tiles": opts.block_tiles, "n_blocks": len(tiled.shares)}
        staging.manifest = manifest
    dataset = staging.dataset
    t2 = time.perf_counter()
    checks = shard_checks(dataset, tiled)
    timings = {"read_s": t_read, **{f"{k}_s": v for k, v in tiled.timings_s.items()}, "write_s": t2 - t1,
               "checks_s": time.perf_counter() - t2}
    result = TileShardsResult(dataset, tiled, dataset.manifest, timings, checks)
    shutil.rmtree(plan.work, ignore_errors=True)  # the pieces are in the shards now
    if not result.failed_checks:
        store.set_current(TILES, region, dataset.data_version)
    result.current = store.current_version(TILES, region)
    if log:
        log(f"tile_shards[{region}] -> {dataset.path} ({len(manifest['shards'])} shards)")
    return result


def build_tile_shards(region: str, store: Store, extract_path: Path | None = None, source: dict | None = None,
                      log: Log | None = None, clip: ClipArea | None = None, **options) -> TileShardsResult:
    """Read, tile and shard the region's extract into an immutable ``tiles/<region>/<data_version>``, in this
    process: ``plan_tile_shards``, ``tile_unit`` of each unit (by blocks, ``workers`` blocks at once in forked
    processes), then ``commit_tile_shards``. The Dagster asset runs the same three steps as ops, a unit per step.

    Nothing becomes visible until the dataset is complete: shards are written to a staging
    directory that is renamed in one step. ``CURRENT`` then moves to it only if every one of
    ``shard_checks`` passes; otherwise the new version stays on disk, readable by its version,
    and ``CURRENT`` stays where it was (``result.failed_checks`` says why). ``options``: fields of
    ``TileShardsOptions``. ``clip``: only the tiles touching that area, their entities whole
    (``geo.clip``); the manifest records it.
    """
    t0 = time.perf_counter()
    plan = plan_tile_shards(region, store, extract_path, source, log=log, clip=clip, **options)
    workers = plan.options.workers or default_workers()
    try:
        if plan.blocks is not None:
            log_plan(plan.blocks, region, log, f"{workers} at a time")
            results = shares_tiled(plan.blocks.layout, plan.units, region, plan.work, clip, workers)
        else:
            results = [tile_unit(plan, WHOLE, workers, log=log)]
        return commit_tile_shards(plan, store, results, log=log, started=t0)
    finally:
        shutil.rmtree(plan.work, ignore_errors=True)  # nothing here resumes a build
