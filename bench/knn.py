"""kNN index benchmark: build time, p50 single-query latency and recall@5 against exact search.

    python bench/knn.py [--n 1000000] [--dim 768] [--queries 200] [--kind random|clustered]

Vectors are L2-normalised (cosine = inner product). Exact search: faiss ``IndexFlatIP`` (the
ground truth, also timed per query). Indexes: HNSW (M 32, efConstruction 64; efSearch 64 /
128 / 256), IVF-Flat (nlist = 4 sqrt(n); nprobe 8 / 32 / 128) and the index ``geojepa knn`` uses
at scale, fast-scan PQ with exact re-rank (``PQ{d/2}x4fs,RFlat``; k_factor 64 / 256 / 1024). ``--kind random`` is the
issue's i.i.d. Gaussian data; ``clustered`` draws around 1,000 centres, closer to real
embeddings. Target: p50 <= 10 ms per query with recall@5 >= 0.95.
"""

from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vectors(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    import faiss

    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        x = centres[rng.integers(0, 1000, n)] + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def p50_and_recall(index, queries: np.ndarray, truth: np.ndarray, k: int = 5) -> tuple[float, float]:
    lat, found = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        _, idx = index.search(queries[i:i + 1], k)
        lat.append(time.perf_counter() - t0)
        found.append(idx[0])
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
    return float(np.median(lat) * 1000), recall


def main() -> int:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--kind", choices=["random", "clustered"], default="random")
    p.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build takes minutes at 1M x 768 on 2 cores)")
    args = p.parse_args()
    faiss.omp_set_num_threads(2)
    x = vectors(args.n, args.dim, args.kind, 0)
    q = vectors(args.queries, args.dim, args.kind, 1)
    print(f"{args.n:,} x {args.dim} {args.kind} vectors ({x.nbytes / 2**30:.2f} GiB), {args.queries} queries, k = 5")
    flat = faiss.IndexFlatIP(args.dim)
    t0 = time.perf_counter()
    flat.add(x)
    print(f"exact (IndexFlatIP): build {time.perf_counter() - t0:.1f} s", end="; ")
    _, truth = flat.search(q, 5)
    p50, _ = p50_and_recall(flat, q[:50], truth[:50])
    print(f"p50 {p50:.1f} ms per query, recall 1.000")
    if not args.no_hnsw:
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 64
        t0 = time.perf_counter()
        hnsw.add(x)
        print(f"HNSW M32: build {time.perf_counter() - t0:.1f} s")
        for ef in (64, 128, 256):
            hnsw.hnsw.efSearch = ef
            p50, recall = p50_and_recall(hnsw, q, truth)
            print(f"  efSearch {ef:4d}: p50 {p50:.2f} ms, recall@5 {recall:.3f}")
        del hnsw
    nlist = int(4 * np.sqrt(args.n))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    ivf.train(x[np.random.default_rng(2).choice(args.n, min(args.n, 40 * nlist), replace=False)])
    ivf.add(x)
    print(f"IVF{nlist},Flat: build {time.perf_counter() - t0:.1f} s")
    for nprobe in (8, 32, 128):
        ivf.nprobe = nprobe
        p50, recall = p50_and_recall(ivf, q, truth)
        print(f"  nprobe {nprobe:4d}: p50 {p50:.2f} ms, recall@5 {recall:.3f}")
    del ivf
    # the index `geojepa knn` uses at scale: fast-scan PQ (4 bits per 2 dims) + exact re-rank
    from geojepa_pipeline.evaluate.index import CosineIndex

    t0 = time.perf_counter()
    pq = CosineIndex(x, exact_max=0)
    print(f"{pq.kind} (geojepa_pipeline.evaluate.index): build {time.perf_counter() - t0:.1f} s")
    for k_factor in (64, 256, 1024):
        faiss.downcast_index(pq.faiss_index).k_factor = k_factor
        p50, recall = p50_and_recall(pq.faiss_index, q, truth)
        print(f"  k_factor {k_factor:4d}: p50 {p50:.2f} ms, recall@5 {recall:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
