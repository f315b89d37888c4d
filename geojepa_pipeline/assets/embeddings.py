"""``tile_embeddings[region|variant]``: every tile of a region embedded by a variant's checkpoint; a thin wrapper over
``stages.embeddings``.

Partitioned by region x variant (a ``MultiPartitionsDefinition``): one cell per (region, variant) in the UI's
partition grid, so a user sees at a glance which regions have embeddings by which model, and materializes one
cell, a row (a region, every variant) or a column (a variant, every region). Its upstreams map on their own
dimension: ``tile_tokens[region]`` and ``geojepa_checkpoint[variant]``.
"""

import dagster as dg

from ..geo.render import png_markdown
from ..stages.embeddings import build_tile_embeddings
from ..store import TILE_EMBEDDINGS_FILE
from .partitions import regions_partitions
from .resources import GeojepaResource
from .results import dataset_result
from .tokens import tile_tokens
from .training import geojepa_checkpoint, variants_partitions

TILE_EMBEDDINGS_CODE_VERSION = "1"
region_variant_partitions = dg.MultiPartitionsDefinition({"region": regions_partitions, "variant": variants_partitions})


@dg.asset(
    partitions_def=region_variant_partitions,
    # each maps on its own dimension (Dagster infers MultiToSingleDimensionPartitionMapping from the shared definitions)
    deps=[tile_tokens, geojepa_checkpoint],
    code_version=TILE_EMBEDDINGS_CODE_VERSION,
    group_name="embeddings",
    kinds={"parquet", "pytorch"},
    description="Every tile of the region embedded by the variant's current checkpoint (target encoder, every piece): "
                "GeoParquet with the tile squares in EPSG:4326 and UTM, the embedding, the model version and the tokens' "
                "data version. Regions the model never saw are allowed (inference).",
)
def tile_embeddings(context: dg.AssetExecutionContext, geojepa: GeojepaResource) -> dg.MaterializeResult:
    keys = context.partition_key.keys_by_dimension
    region, variant = keys["region"], keys["variant"]
    result = build_tile_embeddings(region, variant, geojepa.store(), geojepa._settings(), log=context.log.info)
    ds = result.dataset
    return dataset_result(ds, {
        "geoparquet": dg.MetadataValue.path(str(ds.file(TILE_EMBEDDINGS_FILE))),
        "model_version": dg.MetadataValue.text(result.model_version),
        "checkpoint": dg.MetadataValue.text(result.checkpoint),
        "tokens_version": dg.MetadataValue.text(result.tokens_version),
        "n_tiles": dg.MetadataValue.int(result.n_tiles),
        "dim": dg.MetadataValue.int(result.dim),
        "tiles_per_s": dg.MetadataValue.float(round(result.n_tiles / max(result.seconds, 1e-9), 1)),
        "pca_map": dg.MetadataValue.md(png_markdown(result.pca_map_png, "tiles coloured by the first 3 PCA components")),
    })


