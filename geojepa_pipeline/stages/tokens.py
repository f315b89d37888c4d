"""Token embeddings without Dagster: the ``tag_embeddings`` vocabulary cache and the ``geometry_encoder``.

``tag_embeddings/@all/<data_version>/`` holds ``pairs.parquet`` (model, key, value, text,
float16 vector; sorted by key, value) and ``policy.json`` (the open keys and thresholds).
The cache only grows: a materialization starts from the newest version made with the same
model, embeds the vocabulary entries it lacks, and writes the union. Unchanged inputs give
byte-identical files, hence the same data version; another model starts from an empty cache,
so its data version differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..columns import fixed_list_to_numpy, float16_rows, float16_rows_field, numpy_to_fixed_list
from ..errors import GeojepaError
from ..progress import Progress
from ..store import (
    CONFIG_FILE, GEOMETRY, GLOBAL_SCOPE, HISTORY_FILE, IMAGES, INPUTS_FILE, PAIRS_FILE, POLICY_FILE, TAGS, TILES, TOKENS,
    WEIGHTS_FILE, Dataset, Store, aligned_shards, missing,
)
from ..tables import sql_path_list
from ..tokenizers.tags import (
    DEFAULT_TAG_MODEL,
    OPEN_MIN_DISTINCT,
    OPEN_MIN_NUMERIC_FRACTION,
    OPEN_MIN_UNIQUE_RATIO,
    TagVocabulary,
    TextEmbedder,
    open_keys,
    pair_text,
    pairs_table,
    vocabulary,
)

TAG_SCHEMA_VERSION = 1

Log = Callable[[str], None]


def region_pair_counts(ds: Dataset) -> dict[tuple[str, str], int]:
    """(key, value) -> number of distinct entities carrying it, over one tile dataset."""
    files = ds.shards("entities")
    if not files:
        return {}
    con = duckdb.connect()
    try:
        rows = con.execute(
            f"WITH e AS (SELECT DISTINCT osm_type, osm_id, tags FROM read_parquet({sql_path_list(files)})), "
            "p AS (SELECT unnest(map_keys(tags)) AS k, unnest(map_values(tags)) AS v FROM e) "
            "SELECT k, v, count(*) FROM p GROUP BY k, v"
        ).fetchall()
    finally:
        con.close()
    return {(k, v): n for k, v, n in rows}


def _key_stats(counts: dict[tuple[str, str], int]) -> dict[str, tuple[int, int, list[str]]]:
    stats: dict[str, list] = {}
    for (k, v), n in counts.items():
        s = stats.setdefault(k, [0, 0, []])
        s[0] += 1
        s[1] += n
        s[2].append(v)
    return {k: (a, b, c) for k, (a, b, c) in stats.items()}


def latest_cache(store: Store, model_id: str) -> Dataset | None:
    """The newest committed tag cache made with ``model_id`` (CURRENT first)."""
    current = store.current(TAGS, GLOBAL_SCOPE)
    if current is not None and current.manifest.get("model_id") == model_id:
        return current
    best = None
    for version in store.versions(TAGS, GLOBAL_SCOPE):
        ds = store.dataset(TAGS, GLOBAL_SCOPE, version)
        if ds.manifest.get("model_id") == model_id and (best is None or ds.manifest["created_at"] > best.manifest["created_at"]):
            best = ds
    return best


def load_vocabulary(ds: Dataset) -> TagVocabulary:
    policy = json.loads(ds.file(POLICY_FILE).read_text())
    return TagVocabulary.from_table(pq.read_table(ds.file(PAIRS_FILE)), set(policy["open_keys"]))


@dataclass
class TagEmbeddingsResult:
    dataset: Dataset
    model_id: str
    n_pairs: int  # vocabulary entries in the cache after this run
    n_new: int  # entries embedded by this run
    n_texts_encoded: int  # texts sent to the model (equals n_new)
    vocab_by_region: dict[str, int]
    observed_pairs_by_region: dict[str, int]
    open_keys: list[str]
    dim: int
    timings_s: dict = field(default_factory=dict)


@dataclass
class TagEmbeddingsOptions:
    """Which text model embeds the tag pairs (``build_tag_embeddings``; the asset's config)."""

    model: str = DEFAULT_TAG_MODEL  # the packaged all-MiniLM-L6-v2, or a sentence-transformers name / local path
    batch_size: int = 256


def build_tag_embeddings(store: Store, regions: list[str], log: Log | None = None, embedder: TextEmbedder | None = None,
                         **options) -> TagEmbeddingsResult:
    """Embed the vocabulary of ``regions`` (their CURRENT tile shards) into the incremental cache.

    One run at a time (``Store.exclusive``): a concurrent run waits, then embeds only the pairs the
    first one did not, and gets the same version when its regions' shards are the same.
    ``options``: fields of ``TagEmbeddingsOptions``; ``embedder`` (tests) replaces the model they name."""
    with store.exclusive(TAGS, GLOBAL_SCOPE, log=log):
        return _build_tag_embeddings(store, regions, log, embedder, TagEmbeddingsOptions(**options))


def _build_tag_embeddings(store: Store, regions: list[str], log: Log | None, embedder: TextEmbedder | None,
                          opts: TagEmbeddingsOptions) -> TagEmbeddingsResult:
    model, batch_size = opts.model, opts.batch_size
    t0 = time.perf_counter()
    per_region: dict[str, dict[tuple[str, str], int]] = {}
    for name in regions:
        per_region[name] = region_pair_counts(store.require(TILES, name))
    counts: dict[tuple[str, str], int] = {}
    for c in per_region.values():
        for kv, n in c.items():
            counts[kv] = counts.get(kv, 0) + n
    open_ = open_keys(_key_stats(counts))
    vocab = vocabulary(list(counts), open_)
    t_vocab = time.perf_counter() - t0

    embedder = embedder or TextEmbedder(model, batch_size=batch_size)
    base = latest_cache(store, embedder.model_id)
    base_table = pq.read_table(base.file(PAIRS_FILE)) if base is not None else None
    have = set(zip(base_table.column("key").to_pylist(), base_table.column("value").to_pylist())) if base_table is not None else set()
    new = [kv for kv in vocab if kv not in have]
    if log:
        src = f"cache {base.data_version}" if base is not None else "an empty cache"
        log(f"tag vocabulary: {len(vocab):,} entries ({len(open_)} open keys) over {len(regions)} region(s); "
            f"{len(new):,} new to embed with {embedder.model_id} (from {src})")
    t1 = time.perf_counter()
    progress = Progress("embed tag pairs", total=len(new), log=log)
    chunks = []
    step = max(1, embedder.batch_size * 8)
    for start in range(0, len(new), step):
        part = new[start:start + step]
        chunks.append(embedder.encode([pair_text(k, v) for k, v in part]))
        progress.update(start + len(part))
    if new:
        progress.finish()
    t_embed = time.perf_counter() - t1
    dim = chunks[0].shape[1] if chunks else (base_table.column("vector").type.list_size if base_table is not None else embedder.dim)
    new_vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    keys = [k for k, _ in new]
    values = [v for _, v in new]
    if base_table is not None:
        keys = base_table.column("key").to_pylist() + keys
        values = base_table.column("value").to_pylist() + values
        base_vec = fixed_list_to_numpy(base_table.column("vector"), np.float16)
        new_vectors = np.concatenate([base_vec.astype(np.float16), new_vectors.astype(np.float16)])
    table = pairs_table(embedder.model_id, keys, values, new_vectors)

    with store.writing(TAGS, GLOBAL_SCOPE) as staging:
        pq.write_table(table, staging.file(PAIRS_FILE), compression="zstd")
        policy = {
            "open_keys": sorted(open_), "open_min_distinct": OPEN_MIN_DISTINCT,
            "open_min_unique_ratio": OPEN_MIN_UNIQUE_RATIO, "open_min_numeric_fraction": OPEN_MIN_NUMERIC_FRACTION,
            "template": "pair_text: '{key} = {value}', '_' and ':' read as spaces; open keys -> '{key}'",
        }
        staging.file(POLICY_FILE).write_text(json.dumps(policy, indent=1, sort_keys=True) + "\n")
        staging.manifest = {
            "schema_version": TAG_SCHEMA_VERSION, "model_id": embedder.model_id, "dim": int(dim),
            "n_pairs": table.num_rows, "n_new": len(new), "regions": sorted(regions),
            "inputs": {name: store.current_version(TILES, name) for name in sorted(regions)},
            "created_at": time.time(),
        }
    return TagEmbeddingsResult(
        staging.dataset, embedder.model_id, table.num_rows, len(new), embedder.n_texts_encoded,
        {n: len(vocabulary(list(c), open_)) for n, c in per_region.items()},
        {n: len(c) for n, c in per_region.items()}, sorted(open_), int(dim),
        {"vocabulary_s": t_vocab, "embed_s": t_embed, "total_s": time.perf_counter() - t0},
    )


# ---- geometry_encoder ---------------------------------------------------------------------

GEOMETRY_SCHEMA_VERSION = 1


@dataclass
class GeometryEncoderOptions:
    """How the geometry encoder is pretrained (``build_geometry_encoder``; the geometry_encoder asset's config)."""

    steps: int = 300  # contrastive pretraining steps (batch 256)
    max_pieces: int = 20000  # pieces sampled from all regions (15 % held out for the probe)
    dim: int = 64  # geometry token size
    seed: int = 0


def sample_pieces(store: Store, regions: list[str], max_pieces: int, seed: int) -> np.ndarray:
    """Up to ``max_pieces`` piece geometries (tile-local metres) drawn evenly from the regions' CURRENT shards.

    Reads one shard's geometry column at a time and keeps only its drawn rows, so memory is the sample's
    plus one shard's, whatever the regions (the draw is the same as over all pieces concatenated)."""
    import shapely

    files = [f for name in sorted(regions) for f in store.require(TILES, name).shards("entities")]
    if not files:
        raise GeojepaError("no regions with tile shards: nothing to pretrain the geometry encoder on")
    counts = np.array([pq.ParquetFile(f).metadata.num_rows for f in files], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    chosen = np.sort(np.random.default_rng(seed).choice(total, max_pieces, replace=False)) if total > max_pieces else np.arange(total)
    wkb = []
    for f, a, b in zip(files, starts[:-1], starts[1:]):
        rows = chosen[np.searchsorted(chosen, a):np.searchsorted(chosen, b)] - a
        if len(rows):
            col = pq.read_table(f, columns=["geometry"]).column("geometry")
            wkb.append(col.take(pa.array(rows)).to_numpy(zero_copy_only=False))
    return shapely.from_wkb(np.concatenate(wkb) if wkb else np.zeros(0, object))


@dataclass
class GeometryEncoderResult:
    dataset: Dataset
    n_train: int
    n_probe: int
    losses: list
    probe: dict
    timings_s: dict
    reused: bool = False  # the CURRENT encoder, pretrained before with the same options on the same shards


def geometry_build_key(opts: GeometryEncoderOptions, inputs: dict) -> str:
    """16 hex digits naming a pretraining by what decides its result: the options and the shards' data versions."""
    blob = {"schema": GEOMETRY_SCHEMA_VERSION, "options": dataclasses.asdict(opts), "inputs": inputs}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def build_geometry_encoder(store: Store, regions: list[str], log: Log | None = None, **options) -> GeometryEncoderResult:
    """Pretrain the PolygonGNN on the regions' pieces; save weights (safetensors) + config + history.

    One run at a time (``Store.exclusive``). When the CURRENT encoder was pretrained with the same
    options on the same shards (its manifest's ``build_key``), it is returned as it is: a concurrent
    run waits for the first one and reuses its encoder; a re-run pretrains nothing.
    ``options``: fields of ``GeometryEncoderOptions`` (steps, max_pieces, dim, seed)."""
    opts = GeometryEncoderOptions(**options)
    with store.exclusive(GEOMETRY, GLOBAL_SCOPE, log=log):
        inputs = {n: store.require(TILES, n).data_version for n in sorted(regions)}
        key = geometry_build_key(opts, inputs)
        current = store.current(GEOMETRY, GLOBAL_SCOPE)
        if current is not None and current.manifest.get("build_key") == key:
            config = json.loads(current.file(CONFIG_FILE).read_text())
            history = json.loads(current.file(HISTORY_FILE).read_text())
            if log:
                log(f"geometry encoder: unchanged (same options, same shards): {current.label}")
            return GeometryEncoderResult(current, config["n_train"], config["n_probe"], history["loss"], history["probe_r2"],
                                         {"train_s": 0.0, "total_s": 0.0}, reused=True)
        return _build_geometry_encoder(store, regions, log, opts, inputs, key)


def _build_geometry_encoder(store: Store, regions: list[str], log: Log | None, opts: GeometryEncoderOptions,
                            inputs: dict, key: str) -> GeometryEncoderResult:
    import torch
    from safetensors.torch import save_file

    from ..tokenizers.geometry import (
        PolygonGNNConfig,
        PretrainConfig,
        pretrain,
        probe,
    )

    steps, max_pieces, dim, seed = opts.steps, opts.max_pieces, opts.dim, opts.seed
    t0 = time.perf_counter()
    geoms = sample_pieces(store, regions, max_pieces, seed)
    order = np.random.default_rng(seed).permutation(len(geoms))
    n_probe = max(1, int(0.15 * len(geoms)))
    probe_set, train_set = geoms[order[:n_probe]], geoms[order[n_probe:]]
    enc_cfg, train_cfg = PolygonGNNConfig(dim=dim), PretrainConfig(steps=steps, seed=seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, losses = pretrain(train_set, enc_cfg, train_cfg, log=log)
    t_train = time.perf_counter() - t0
    report = probe(model, probe_set, seed=seed)
    if log:
        log("geometry encoder probe R² (pretrained / untrained / chance): " + ", ".join(
            f"{k} {v['pretrained']:.2f} / {v['untrained']:.2f} / 0" for k, v in report.items()))
    with store.writing(GEOMETRY, GLOBAL_SCOPE) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging.file(WEIGHTS_FILE)))
        config = {"encoder": enc_cfg.to_dict(), "pretrain": train_cfg.to_dict(), "objective": "InfoNCE between a jittered and a simplified view",
                  "node_features": 9, "edge_features": 3, "inputs": inputs,
                  "n_train": len(train_set), "n_probe": len(probe_set)}
        staging.file(CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        staging.file(HISTORY_FILE).write_text(json.dumps({"loss": [round(v, 5) for v in losses], "probe_r2": report}, sort_keys=True) + "\n")
        staging.manifest = {"schema_version": GEOMETRY_SCHEMA_VERSION, "dim": dim, "regions": sorted(regions), "probe_r2": report,
                            "inputs": inputs, "build_key": key}
    return GeometryEncoderResult(staging.dataset, len(train_set), len(probe_set), losses, report,
                                 {"train_s": t_train, "total_s": time.perf_counter() - t0})


def load_geometry_encoder(ds: Dataset):
    """The PolygonGNN of a committed ``geometry_encoder`` version, in eval mode."""
    from safetensors.torch import load_file

    from ..tokenizers.geometry import PolygonGNNConfig, PolygonGNN

    config = json.loads(ds.file(CONFIG_FILE).read_text())
    model = PolygonGNN(PolygonGNNConfig(**config["encoder"]))
    model.load_state_dict(load_file(str(ds.verified_file(WEIGHTS_FILE))))
    return model.eval()


# ---- tile_tokens ---------------------------------------------------------------------------

TOKENS_SCHEMA_VERSION = 2  # 2: tag and geometry tokens as columns.float16_rows (1: fixed_size_list<float16>)
ENTITY_MODALITY = "entity"


def tokens_schema(tag_dim: int, geom_dim: int) -> pa.Schema:
    """One row per entity piece, in the tile shard's order."""
    return pa.schema([
        ("tile_id", pa.string()),
        ("osm_type", pa.string()),
        ("osm_id", pa.int64()),
        ("modality", pa.string()),  # "entity": a tag token and a geometry token at one position
        float16_rows_field("tag_token", tag_dim),  # sum of the entity's pair vectors (LayerNorm comes in the model)
        float16_rows_field("geometry_token", geom_dim),  # PolygonGNN of the piece
        ("position", pa.list_(pa.float32(), 8)),  # min-box corners in [0, 1] tile units (the shard's minbox)
    ])


@dataclass
class TileTokensResult:
    dataset: Dataset
    n_pieces: int
    n_without_tag_token: int
    timings_s: dict


IMAGE_TOKENIZERS = ("patch", "vit")


def _write_vit_tokens(images_path, tokenizer, path) -> int:
    """One shard of the ``image_tokens`` table: per tile of the chip shard ``images_path``, the ViT's (1 + 196) x hidden
    tokens, float16 (null without image)."""
    from .imagery import decode_chip

    t = pq.read_table(images_path, columns=["tile_id", "has_image", "image"])
    has = t.column("has_image").to_numpy(zero_copy_only=False)
    chips = np.stack([decode_chip(b) for b, h in zip(t.column("image").to_pylist(), has) if h]) if has.any() else np.zeros((0, 224, 224, 4), np.uint8)
    tokens = tokenizer.encode(chips).astype(np.float16)  # (n_with_image, 197, hidden)
    width = (1 + 196) * tokenizer.hidden
    full = np.zeros((len(has), width), np.float16)
    full[has] = tokens.reshape(len(tokens), -1)
    column = numpy_to_fixed_list(full, pa.float16(), mask=~has)
    table = pa.table({"tile_id": t.column("tile_id"), "vit_tokens": column})
    table = table.replace_schema_metadata({b"geojepa:vit": json.dumps({"tokens": 1 + 196, "hidden": tokenizer.hidden, "model": tokenizer.model_id}).encode()})
    pq.write_table(table, path, compression="zstd")
    return int(has.sum())


@dataclass
class TileTokensOptions:
    """How tile_tokens tokenizes (``build_tile_tokens``; the asset's config exposes the image tokenizer)."""

    image_tokenizer: str = "patch"  # patch: learned inside GeoJEPA, nothing cached; vit: frozen ViT tokens cached per shard
    vit_model: str = ""  # for vit: a local path saved with save_pretrained, or a hub id (HF_HUB_OFFLINE respected)
    batch_pieces: int = 8192  # pieces tokenized per batch


def build_tile_tokens(region: str, store: Store, log: Log | None = None, **options) -> TileTokensResult:
    """Tag and geometry tokens of every piece of the region's CURRENT tile shards, aligned with them.

    ``options``: fields of ``TileTokensOptions``.

    ``image_tokenizer``: ``patch`` (the default) caches nothing for images (GeoJEPA learns the
    patch projection); ``vit`` runs the frozen ViT ``vit_model`` over the region's chips and
    caches its tokens per shard (the ``image_tokens`` table, aligned with the tile shard).
    """
    import shapely
    import torch

    from ..tokenizers.geometry import geometry_graphs

    opts = TileTokensOptions(**options)
    batch_pieces, image_tokenizer, vit_model = opts.batch_pieces, opts.image_tokenizer, opts.vit_model or None
    tiles = store.require(TILES, region)
    tags_ds = store.require(TAGS, GLOBAL_SCOPE)
    geom_ds = store.require(GEOMETRY, GLOBAL_SCOPE)
    if region not in tags_ds.manifest.get("regions", []):
        raise GeojepaError(f"tag_embeddings {tags_ds.data_version} was built without region {region!r}; re-materialize tag_embeddings")
    vocab = load_vocabulary(tags_ds)
    encoder = load_geometry_encoder(geom_ds)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    schema = tokens_schema(vocab.vectors.shape[1], encoder.config.dim)
    if image_tokenizer not in IMAGE_TOKENIZERS:
        raise GeojepaError(f"unknown image_tokenizer {image_tokenizer!r}: use one of {', '.join(IMAGE_TOKENIZERS)}")
    images = store.current(IMAGES, region)
    vit = None
    if image_tokenizer == "vit":
        if not vit_model:
            raise GeojepaError("image_tokenizer 'vit' needs vit_model: a local path saved with save_pretrained or a hub id")
        if images is None:
            raise missing(IMAGES, region)
        from ..tokenizers.image import VitTokenizer

        vit = VitTokenizer(vit_model)
    inputs = {"tile_shards": tiles.data_version, "tag_embeddings": tags_ds.data_version, "geometry_encoder": geom_ds.data_version,
              "tile_images": images.data_version if images is not None else None, "image_tokenizer": image_tokenizer,
              "vit_model": vit.model_id if vit is not None else None}
    t0 = time.perf_counter()
    n_pieces = n_no_tag = 0
    shards = []
    progress = Progress(f"tile_tokens[{region}]", total=tiles.manifest["n_pieces"], log=log)
    with store.writing(TOKENS, region) as staging:
        staging.file(INPUTS_FILE).write_text(json.dumps(inputs, sort_keys=True) + "\n")  # the version follows the inputs
        shard_files = aligned_shards((tiles, "entities"), (images if vit else None, "images"))
        for shard, (entities_path, images_path) in zip(tiles.shard_entries, shard_files):
            path = staging.shard("tokens", shard["index"])
            ents = pq.read_table(entities_path, columns=["tile_id", "osm_type", "osm_id", "tags", "geometry", "minbox"])
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                for start in range(0, ents.num_rows, batch_pieces):
                    part = ents.slice(start, batch_pieces)
                    tag_tok = vocab.tag_tokens(part.column("tags"))
                    geoms = shapely.from_wkb(part.column("geometry").to_numpy(zero_copy_only=False))
                    geom_tok = encoder.encode(geometry_graphs(geoms))
                    n_no_tag += int((np.abs(tag_tok).sum(axis=1) == 0).sum())
                    writer.write_table(pa.table({
                        "tile_id": part.column("tile_id"), "osm_type": part.column("osm_type"), "osm_id": part.column("osm_id"),
                        "modality": pa.array([ENTITY_MODALITY] * part.num_rows, pa.string()),
                        "tag_token": float16_rows(tag_tok),
                        "geometry_token": float16_rows(geom_tok),
                        "position": part.column("minbox").cast(pa.list_(pa.float32(), 8)),
                    }, schema=schema))
                    n_pieces += part.num_rows
                    progress.update(n_pieces)
            files, facts = {"tokens": path, "entities": entities_path}, {"n_pieces": ents.num_rows}
            if vit is not None:
                files["image_tokens"] = staging.shard("image_tokens", shard["index"])
                facts["n_image_tokens"] = _write_vit_tokens(images_path, vit, files["image_tokens"])
            shards.append(staging.shard_entry(shard["index"], files, **facts))
        progress.finish()
        staging.manifest = {"schema_version": TOKENS_SCHEMA_VERSION, "inputs": inputs, "n_pieces": n_pieces, "shards": shards,
                            "tag_dim": int(vocab.vectors.shape[1]), "geometry_dim": int(encoder.config.dim),
                            "n_without_tag_token": n_no_tag}
    return TileTokensResult(staging.dataset, n_pieces, n_no_tag, {"tokens_s": time.perf_counter() - t0})
