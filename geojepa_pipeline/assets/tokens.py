"""``tag_embeddings``, ``geometry_encoder`` (over all regions) and ``tile_tokens[region]``: thin wrappers over ``stages.tokens``."""

import dataclasses
import math

import dagster as dg
import numpy as np
import pyarrow.parquet as pq

from ..geo.render import curve_png, png_markdown
from ..errors import GeojepaError
from ..store import TILES, aligned_shards
from ..geo.splits import Holdout
from ..stages.tokens import (
    GeometryEncoderOptions, TagEmbeddingsOptions, TileTokensOptions, build_geometry_encoder, build_tag_embeddings,
    build_tile_tokens,
)
from .imagery import tile_images
from .osm import tile_shards
from .automation import on_upstream_data_change
from .config import config_from, values_for
from .partitions import regions_partitions
from .results import dataset_result
from .resources import GeojepaResource

TAG_EMBEDDINGS_CODE_VERSION = "1"
GEOMETRY_ENCODER_CODE_VERSION = "2"  # 1: its regions in its manifest; 2: its inputs and build_key (an unchanged re-run pretrains nothing)
TILE_TOKENS_CODE_VERSION = "1"


TagEmbeddingsConfig = config_from("TagEmbeddingsConfig", TagEmbeddingsOptions)


@dg.asset(
    deps=[tile_shards],
    code_version=TAG_EMBEDDINGS_CODE_VERSION,
    group_name="tokens",
    kinds={"parquet"},
    description="Text embeddings of every (key, value) tag pair in the regions' tile shards (float16), cached "
                "incrementally per model: a re-run embeds only pairs it has not seen.",
)
def tag_embeddings(context: dg.AssetExecutionContext, config: TagEmbeddingsConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    store = geojepa.store()
    regions, skipped = geojepa.regions_with_tiles()
    if skipped:
        context.log.warning(f"regions without tile_shards are left out of the vocabulary: {', '.join(skipped)}")
    result = build_tag_embeddings(store, regions, log=context.log.info, **config.model_dump())
    ds = result.dataset
    return dataset_result(
        ds, {
            "model_id": dg.MetadataValue.text(result.model_id),
            "dim": dg.MetadataValue.int(result.dim),
            "n_pairs": dg.MetadataValue.int(result.n_pairs),
            "n_new_embedded": dg.MetadataValue.int(result.n_new),
            "vocabulary_by_region": dg.MetadataValue.json(result.vocab_by_region),
            "observed_pairs_by_region": dg.MetadataValue.json(result.observed_pairs_by_region),
            "n_open_keys": dg.MetadataValue.int(len(result.open_keys)),
            "open_keys": dg.MetadataValue.json(result.open_keys[:200]),
            "regions": dg.MetadataValue.json(regions),
            "pairs_per_s": dg.MetadataValue.float(round(result.n_new / max(result.timings_s["embed_s"], 1e-9), 1)),
            "timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
        },
    )


GeometryEncoderConfig = config_from("GeometryEncoderConfig", GeometryEncoderOptions, Holdout)


@dg.asset(
    deps=[tile_shards],
    code_version=GEOMETRY_ENCODER_CODE_VERSION,
    group_name="tokens",
    kinds={"pytorch"},
    description="PolygonGNN geometry encoder (torch-geometric), pretrained self-supervised (InfoNCE over jittered vs "
                "simplified views) on the regions' own pieces; safetensors + JSON config.",
)
def geometry_encoder(context: dg.AssetExecutionContext, config: GeometryEncoderConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    store = geojepa.store()
    regions, _ = geojepa.regions_with_tiles()
    regions = [r for r in regions if r not in set(config.holdout_regions)]
    options = dataclasses.asdict(values_for(GeometryEncoderOptions, config))
    result = build_geometry_encoder(store, regions, log=context.log.info, **options)
    ds = result.dataset
    chance = math.log(min(256, result.n_train))
    return dataset_result(
        ds, {
            "unchanged": dg.MetadataValue.bool(result.reused),
            "n_train_pieces": dg.MetadataValue.int(result.n_train),
            "n_probe_pieces": dg.MetadataValue.int(result.n_probe),
            "final_loss": dg.MetadataValue.float(round(float(np.mean(result.losses[-20:])), 4)),
            "probe_r2": dg.MetadataValue.json(result.probe),
            "loss_curve": dg.MetadataValue.md(png_markdown(
                curve_png(result.losses, f"InfoNCE per step (dashed: chance {chance:.2f})", reference=chance), "loss curve")),
            "regions": dg.MetadataValue.json(regions),
            "timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
        },
    )


TileTokensConfig = config_from("TileTokensConfig", TileTokensOptions, exclude=("batch_pieces",))


@dg.asset(
    automation_condition=on_upstream_data_change(),
    partitions_def=regions_partitions,
    deps=[tile_shards, tag_embeddings, geometry_encoder, tile_images],
    code_version=TILE_TOKENS_CODE_VERSION,
    group_name="tokens",
    kinds={"parquet"},
    description="Per entity piece: tag token (sum of pair vectors), geometry token (PolygonGNN), 8-number position; "
                "shards aligned with tile_shards. With image_tokenizer=vit, frozen ViT tokens of the chips per shard.",
    check_specs=[dg.AssetCheckSpec("aligned_with_entities", asset="tile_tokens",
                                   description="One token row per entity piece, same shards and order as tile_shards.")],
)
def tile_tokens(context: dg.AssetExecutionContext, config: TileTokensConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    region = context.partition_key
    store = geojepa.store()
    result = build_tile_tokens(region, store, log=context.log.info, **config.model_dump())
    ds = result.dataset
    tiles = store.current(TILES, region)
    problems = []
    try:
        pairs = aligned_shards((tiles, "entities"), (ds, "tokens"))
    except GeojepaError as e:  # the shard indices differ
        pairs, problems = [], [str(e)]
    for entities_path, tokens_path in pairs:
        ents = pq.read_table(entities_path, columns=["tile_id", "osm_id"])
        toks = pq.read_table(tokens_path, columns=["tile_id", "osm_id"])
        if not (ents.column("tile_id").equals(toks.column("tile_id")) and ents.column("osm_id").equals(toks.column("osm_id"))):
            problems.append(f"{tokens_path.name} differs from {entities_path.name}")
    return dataset_result(
        ds, {
            "n_pieces": dg.MetadataValue.int(result.n_pieces),
            "n_without_tag_token": dg.MetadataValue.int(result.n_without_tag_token),
            "image_tokenizer": dg.MetadataValue.text(config.image_tokenizer),
            "n_tiles_with_vit_tokens": dg.MetadataValue.int(sum(s.get("n_image_tokens", 0) for s in ds.shard_entries)),
            "inputs": dg.MetadataValue.json(ds.manifest["inputs"]),
            "tag_dim": dg.MetadataValue.int(ds.manifest["tag_dim"]),
            "geometry_dim": dg.MetadataValue.int(ds.manifest["geometry_dim"]),
            "tokens_per_s": dg.MetadataValue.float(round(result.n_pieces / max(result.timings_s["tokens_s"], 1e-9), 1)),
        },
        check_results=[dg.AssetCheckResult(check_name="aligned_with_entities", passed=not problems,
                                           metadata={"problems": dg.MetadataValue.json(problems[:20])})],
    )
