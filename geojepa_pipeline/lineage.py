"""What was a model version trained on, and which model versions used a region version.

Everything comes from two places that outlive any one run: the MLflow tags written at
training time (``training.build_checkpoint``: ``dagster.run_id``, ``input.<asset>/<region>``
data versions, ``input.osm_sha256/<region>``, ...) and the store's immutable datasets, which
still hold every older version those tags name. No Dagster import: the CLI and notebooks
use this directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .errors import GeojepaError
from .stages.osm import source_stamp
from .store import CHECKPOINTS, EMBEDDINGS, GLOBAL_SCOPE, KINDS, OSM, REGION_VARIANT_SCOPE, SCENES, VARIANT_SCOPE, Store

MODEL_PREFIX = "geojepa-"
# input asset -> store kind (the tags say ``input.<asset>/<region>`` or ``input.<asset>`` for @all)
# asset -> kind of every versioned input a checkpoint records (the sources and the models themselves aside)
INPUT_KINDS = {k.asset: k.name for k in KINDS.values() if k.name != OSM and k.scope not in (VARIANT_SCOPE, REGION_VARIANT_SCOPE)}


@dataclass
class InputVersion:
    asset: str
    region: str  # a region name, or "@all" for the assets over all regions
    data_version: str
    readable: bool  # the store still holds this exact version (and, for the checkpoint, its bytes are intact)
    problems: list[str] = field(default_factory=list)  # files that differ from the manifest (the checkpoint is verified)


@dataclass
class RegionSource:
    region: str
    osm_uri: str | None
    osm_sha256: str | None
    fetched_at: str | None
    imagery_source: str | None
    scene_ids: list[str] = field(default_factory=list)


@dataclass
class ModelLineage:
    model: str
    version: str
    created: str
    run_id: str
    run_status: str
    run_link: str
    dagster_run_id: str | None
    code_version: str | None
    git_commit: str | None
    checkpoint: InputVersion | None
    inputs: list[InputVersion]
    regions: list[RegionSource]
    embeddings: list[dict] = field(default_factory=list)  # the tile_embeddings versions made from this checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``geojepa-GT:3`` -> ("geojepa-GT", "3"); ``GT`` or ``geojepa-GT`` -> (name, None = latest)."""
    name, _, version = spec.partition(":")
    if not name:
        raise GeojepaError(f"bad model {spec!r}: use NAME[:VERSION], e.g. geojepa-GT:2 or GT")
    if not name.startswith(MODEL_PREFIX):
        name = MODEL_PREFIX + name
    if version and not version.isdigit():
        raise GeojepaError(f"bad model version in {spec!r}: versions are numbers, e.g. {name}:1")
    return name, version or None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _ms_to_iso(ms) -> str:
    return datetime.fromtimestamp(int(ms) / 1000, timezone.utc).isoformat(timespec="seconds") if ms else "?"


def _model_versions(client, name: str | None = None) -> list:
    """Every registered version of ``name`` (default: of every ``geojepa-*`` model), oldest first."""
    names = [name] if name else [m.name for m in client.search_registered_models() if m.name.startswith(MODEL_PREFIX)]
    out = []
    for n in names:
        out += client.search_model_versions(f"name = '{n}'")
    return sorted(out, key=lambda v: (v.name, int(v.version)))


def _run_link(uri: str, experiment_id: str, run_id: str) -> str:
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {experiment_id}, run {run_id}; browse with: mlflow ui --backend-store-uri {uri})"


def _readable(store: Store, kind: str, region: str, version: str) -> bool:
    return version in store.versions(kind, region)


def _verified_checkpoint(store: Store, variant: str, version: str) -> InputVersion:
    """The checkpoint's version, readable only when every file matches the sha256 its manifest recorded."""
    held = _readable(store, CHECKPOINTS, variant, version)
    problems = store.dataset(CHECKPOINTS, variant, version).verify() if held else []
    return InputVersion("geojepa_checkpoint", variant, version, held and not problems, problems)


def model_lineage(uri: str, store: Store, spec: str) -> ModelLineage:
    """The chain behind one registered model version (latest when ``spec`` has no version)."""
    from mlflow.exceptions import MlflowException

    name, version = parse_model_spec(spec)
    client = _client(uri)
    try:
        if version is None:
            versions = _model_versions(client, name)
            if not versions:
                raise GeojepaError(f"model {name} has no versions in {uri}; train one with: geojepa materialize --select geojepa_checkpoint")
            mv = versions[-1]
        else:
            mv = client.get_model_version(name, version)
    except MlflowException:
        known = ", ".join(sorted({v.name for v in _model_versions(client)})) or "none"
        raise GeojepaError(f"no model version {name}:{version or 'latest'} in {uri} (registered models: {known})") from None
    run = client.get_run(mv.run_id)
    tags = {**run.data.tags, **(mv.tags or {})}
    inputs, sources = [], {}
    for key, value in sorted(tags.items()):
        if not key.startswith("input.") or not value:
            continue
        asset, _, region = key[len("input."):].partition("/")
        region = region or GLOBAL_SCOPE
        if asset in INPUT_KINDS:
            inputs.append(InputVersion(asset, region, value, _readable(store, INPUT_KINDS[asset], region, value)))
        if region != GLOBAL_SCOPE:
            sources.setdefault(region, {})[asset] = value
    regions = []
    for region, found in sorted(sources.items()):
        sha = found.get("osm_sha256")
        stamp = source_stamp(store, region, sha) or {}
        scenes_version = found.get("naip_scenes")
        scene_ids, imagery = [], None
        if scenes_version and _readable(store, SCENES, region, scenes_version):
            manifest = store.dataset(SCENES, region, scenes_version).manifest
            scene_ids = [s.get("scene_id") for s in manifest.get("scenes", [])]
            imagery = manifest.get("source")
        regions.append(RegionSource(region, found.get("osm_uri") or stamp.get("uri"), sha, stamp.get("fetched_at"), imagery, scene_ids))
    ckpt = tags.get("geojepa.data_version")
    variant = name[len(MODEL_PREFIX):]
    return ModelLineage(
        model=name, version=str(mv.version), created=_ms_to_iso(mv.creation_timestamp),
        run_id=run.info.run_id, run_status=run.info.status, run_link=_run_link(uri, run.info.experiment_id, run.info.run_id),
        dagster_run_id=tags.get("dagster.run_id"), code_version=tags.get("dagster.code_version"),
        git_commit=tags.get("geojepa.git_commit"),
        checkpoint=_verified_checkpoint(store, variant, ckpt) if ckpt else None,
        inputs=inputs, regions=regions, embeddings=embedding_versions(store, checkpoint=ckpt) if ckpt else [],
    )


def embedding_versions(store: Store, region: str | None = None, checkpoint: str | None = None) -> list[dict]:
    """Every stored ``tile_embeddings`` version (older ones too) of ``region`` and/or made from the checkpoint data
    version ``checkpoint``: region, variant, data version, model version, checkpoint, tokens version, tiles, current."""
    rows = []
    for scope in store.regions(EMBEDDINGS):
        reg, _, variant = scope.rpartition(".")
        if region is not None and reg != region:
            continue
        current = store.current_version(EMBEDDINGS, scope)
        for version in store.versions(EMBEDDINGS, scope):
            m = store.dataset(EMBEDDINGS, scope, version).manifest
            if checkpoint is not None and m["inputs"]["checkpoint"] != checkpoint:
                continue
            rows.append({"region": reg, "variant": variant, "data_version": version, "model_version": m.get("model_version"),
                         "checkpoint": m["inputs"]["checkpoint"], "tile_tokens": m["inputs"]["tile_tokens"],
                         "n_tiles": m.get("n_tiles"), "current": version == current})
    return rows


def parse_region_spec(spec: str) -> tuple[str, str | None]:
    """``li@3f2a9c`` -> ("li", "3f2a9c"); ``li`` -> ("li", None)."""
    from .regions import validate_name

    region, _, version = spec.partition("@")
    validate_name(region)
    if version and (len(version) < 6 or any(c not in "0123456789abcdef" for c in version)):
        raise GeojepaError(f"bad region version in {spec!r}: give at least 6 hex digits of a tile_shards data version or an OSM sha256")
    return region, version or None


def models_trained_on(uri: str, spec: str) -> list[dict]:
    """Model versions whose inputs include region ``spec`` (``NAME`` or ``NAME@DATA_VERSION``).

    A version prefix matches the region's ``tile_shards`` data version or its OSM sha256.
    """
    region, version = parse_region_spec(spec)
    client = _client(uri)
    rows = []
    for mv in _model_versions(client):
        tags = mv.tags or {}
        shards, sha = tags.get(f"input.tile_shards/{region}"), tags.get(f"input.osm_sha256/{region}")
        if shards is None:
            continue
        if version and not (shards.startswith(version) or (sha or "").startswith(version)):
            continue
        rows.append({"model": mv.name, "version": str(mv.version), "created": _ms_to_iso(mv.creation_timestamp),
                     "run_id": mv.run_id, "tile_shards": shards, "osm_sha256": sha,
                     "dagster_run_id": tags.get("dagster.run_id")})
    return rows


def format_model_lineage(lin: ModelLineage) -> str:
    """The chain as text: model -> MLflow run -> Dagster run -> input data versions -> sources -> scenes."""
    from .text import format_table

    def present(ok: bool, problems: list[str] = ()) -> str:
        if problems:
            return f"DAMAGED: {len(problems)} file(s) differ from the manifest's sha256 ({problems[0].split(': ', 1)[1]}); re-materialize it"
        return "readable" if ok else "MISSING from the store"

    lines = [
        f"model         {lin.model}:{lin.version} (registered {lin.created})",
        f"mlflow run    {lin.run_id} {lin.run_status}: {lin.run_link}",
        f"dagster run   {lin.dagster_run_id or 'unknown (not trained through Dagster)'}"
        f"  (geojepa_checkpoint code version {lin.code_version or '?'})",
        f"git commit    {lin.git_commit or 'unknown'}",
    ]
    if lin.checkpoint:
        lines.append(f"checkpoint    checkpoints/{lin.checkpoint.region}@{lin.checkpoint.data_version} ({present(lin.checkpoint.readable, lin.checkpoint.problems)})")
    lines += ["", "input data versions:", format_table(
        ["asset", "region", "data version", "in store"],
        [(i.asset, i.region, i.data_version, present(i.readable)) for i in lin.inputs], max_width=70)]
    for r in lin.regions:
        scenes = ", ".join(r.scene_ids[:8]) + (f", … (+{len(r.scene_ids) - 8})" if len(r.scene_ids) > 8 else "")
        lines += ["", f"region {r.region}:",
                  f"  osm source  {r.osm_uri or '?'}",
                  f"  sha256      {r.osm_sha256 or '?'} (fetched {r.fetched_at or '?'})",
                  f"  imagery     {r.imagery_source or '-'}: {len(r.scene_ids)} scene(s){': ' + scenes if scenes else ''}"]
    lines += ["", "embeddings made from it:" if lin.embeddings else "embeddings made from it: none (geojepa materialize --select tile_embeddings)"]
    if lin.embeddings:
        lines.append(format_embeddings(lin.embeddings))
    return "\n".join(lines)


def format_embeddings(rows: list[dict]) -> str:
    """``embedding_versions`` rows as a table."""
    from .text import format_table

    return format_table(["region", "variant", "data version", "model version", "tile_tokens", "tiles", "current"],
                        [(r["region"], r["variant"], r["data_version"], r["model_version"], r["tile_tokens"], r["n_tiles"],
                          "yes" if r["current"] else "") for r in rows], max_width=40)
