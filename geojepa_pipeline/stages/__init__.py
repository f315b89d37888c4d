"""The builders: one module per asset module, each turning store datasets into the next, without Dagster.

``osm`` (osm_extract, tile_shards), ``imagery`` (naip_scenes, tile_images), ``tokens`` (tag_embeddings,
geometry_encoder, tile_tokens), ``training`` (geojepa_checkpoint), ``evaluation`` (evaluation_report);
``sources`` and ``stac`` fetch what the first stages read. ``geojepa_pipeline.assets`` wraps each in
an asset; the CLI calls them through Dagster or directly. They read and write only through
``geojepa_pipeline.store`` and hand arrays, tables and paths to the pure core (geo, tokenizers,
model, train, evaluate).
"""
