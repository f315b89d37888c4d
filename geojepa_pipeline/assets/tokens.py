"""``tag_embeddings``: the (key, value) vocabulary cache over all regions; a thin wrapper over ``tokens``."""


import dagster as dg

from ..ingest import TILES_KIND
from ..tokenizers.tags import DEFAULT_TAG_MODEL
from ..tokens import build_tag_embeddings
from .osm import tile_shards
from .resources import GeojepaResource

TAG_EMBEDDINGS_CODE_VERSION = "1"


class TagEmbeddingsConfig(dg.Config):
    model: str = DEFAULT_TAG_MODEL  # the packaged all-MiniLM-L6-v2, or a sentence-transformers name / local path
    batch_size: int = 256


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
    registered = sorted(geojepa.registry().load())
    regions = [r for r in registered if store.current_version(TILES_KIND, r)]
    skipped = sorted(set(registered) - set(regions))
    if skipped:
        context.log.warning(f"regions without tile_shards are left out of the vocabulary: {', '.join(skipped)}")
    result = build_tag_embeddings(store, regions, model=config.model, batch_size=config.batch_size, log=context.log.info)
    ds = result.dataset
    return dg.MaterializeResult(
        data_version=dg.DataVersion(ds.data_version),
        metadata={
            "data_version": dg.MetadataValue.text(ds.data_version),
            "path": dg.MetadataValue.path(str(ds.path)),
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
