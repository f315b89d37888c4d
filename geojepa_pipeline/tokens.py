"""Token embeddings without Dagster: the ``tag_embeddings`` vocabulary cache (more tokenizers follow).

``tag_embeddings/@all/<data_version>/`` holds ``pairs.parquet`` (model, key, value, text,
float16 vector; sorted by key, value) and ``policy.json`` (the open keys and thresholds).
The cache only grows: a materialization starts from the newest version made with the same
model, embeds the vocabulary entries it lacks, and writes the union. Unchanged inputs give
byte-identical files, hence the same data version; another model starts from an empty cache,
so its data version differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import pyarrow.parquet as pq

from .errors import GeojepaError
from .ingest import TILES_KIND
from .progress import Progress
from .store import GLOBAL_SCOPE, Dataset, Store
from .tables import _sql_list, shard_files
from .tokenizers.tags import (
    DEFAULT_TAG_MODEL, OPEN_MIN_DISTINCT, OPEN_MIN_NUMERIC_FRACTION, OPEN_MIN_UNIQUE_RATIO,
    TagVocabulary, TextEmbedder, open_keys, pair_text, pairs_table, vocabulary,
)

TAG_KIND = "tag_embeddings"
TAG_SCHEMA_VERSION = 1
PAIRS_FILE = "pairs.parquet"
POLICY_FILE = "policy.json"

Log = Callable[[str], None]


def region_pair_counts(ds: Dataset) -> dict[tuple[str, str], int]:
    """(key, value) -> number of distinct entities carrying it, over one tile dataset."""
    files = shard_files(ds, "entities")
    if not files:
        return {}
    con = duckdb.connect()
    try:
        rows = con.execute(
            f"WITH e AS (SELECT DISTINCT osm_type, osm_id, tags FROM read_parquet({_sql_list(files)})), "
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
    current = store.current(TAG_KIND, GLOBAL_SCOPE)
    if current is not None and current.manifest.get("model_id") == model_id:
        return current
    best = None
    for version in store.versions(TAG_KIND, GLOBAL_SCOPE):
        ds = store.dataset(TAG_KIND, GLOBAL_SCOPE, version)
        if ds.manifest.get("model_id") == model_id and (best is None or ds.manifest["created_at"] > best.manifest["created_at"]):
            best = ds
    return best


def load_vocabulary(ds: Dataset) -> TagVocabulary:
    policy = json.loads((ds.path / POLICY_FILE).read_text())
    return TagVocabulary.from_table(pq.read_table(ds.path / PAIRS_FILE), set(policy["open_keys"]))


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


def build_tag_embeddings(
    store: Store, regions: list[str], model: str = DEFAULT_TAG_MODEL, batch_size: int = 256,
    log: Log | None = None, embedder: TextEmbedder | None = None,
) -> TagEmbeddingsResult:
    """Embed the vocabulary of ``regions`` (their CURRENT tile shards) into the incremental cache."""
    t0 = time.perf_counter()
    per_region: dict[str, dict[tuple[str, str], int]] = {}
    for name in regions:
        ds = store.current(TILES_KIND, name)
        if ds is None:
            raise GeojepaError(f"region {name!r} has no tile_shards yet; materialize tile_shards[{name}] first")
        per_region[name] = region_pair_counts(ds)
    counts: dict[tuple[str, str], int] = {}
    for c in per_region.values():
        for kv, n in c.items():
            counts[kv] = counts.get(kv, 0) + n
    open_ = open_keys(_key_stats(counts))
    vocab = vocabulary(list(counts), open_)
    t_vocab = time.perf_counter() - t0

    embedder = embedder or TextEmbedder(model, batch_size=batch_size)
    base = latest_cache(store, embedder.model_id)
    base_table = pq.read_table(base.path / PAIRS_FILE) if base is not None else None
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
    import numpy as np

    dim = chunks[0].shape[1] if chunks else (base_table.column("vector").type.list_size if base_table is not None else embedder.dim)
    new_vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    keys = [k for k, _ in new]
    values = [v for _, v in new]
    if base_table is not None:
        keys = base_table.column("key").to_pylist() + keys
        values = base_table.column("value").to_pylist() + values
        base_vec = base_table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        new_vectors = np.concatenate([base_vec.astype(np.float16), new_vectors.astype(np.float16)])
    table = pairs_table(embedder.model_id, keys, values, new_vectors)

    staging = store.new_staging_dir(TAG_KIND, GLOBAL_SCOPE)
    try:
        pq.write_table(table, staging / PAIRS_FILE, compression="zstd")
        policy = {
            "open_keys": sorted(open_), "open_min_distinct": OPEN_MIN_DISTINCT,
            "open_min_unique_ratio": OPEN_MIN_UNIQUE_RATIO, "open_min_numeric_fraction": OPEN_MIN_NUMERIC_FRACTION,
            "template": "pair_text: '{key} = {value}', '_' and ':' read as spaces; open keys -> '{key}'",
        }
        (staging / POLICY_FILE).write_text(json.dumps(policy, indent=1, sort_keys=True) + "\n")
        manifest = {
            "schema_version": TAG_SCHEMA_VERSION, "model_id": embedder.model_id, "dim": int(dim),
            "n_pairs": table.num_rows, "n_new": len(new), "regions": sorted(regions),
            "inputs": {name: store.current_version(TILES_KIND, name) for name in sorted(regions)},
            "created_at": time.time(),
        }
        dataset = store.commit(TAG_KIND, GLOBAL_SCOPE, staging, manifest)
    except BaseException:
        store.discard_staging(staging)
        raise
    store.set_current(TAG_KIND, GLOBAL_SCOPE, dataset.data_version)
    return TagEmbeddingsResult(
        dataset, embedder.model_id, table.num_rows, len(new), embedder.n_texts_encoded,
        {n: len(vocabulary(list(c), open_)) for n, c in per_region.items()},
        {n: len(c) for n, c in per_region.items()}, sorted(open_), int(dim),
        {"vocabulary_s": t_vocab, "embed_s": t_embed, "total_s": time.perf_counter() - t0},
    )
