"""Where `dclip search` should stop scanning exactly: one query's latency by exact matrix product
and top-k (torch) against an HNSW index (usearch, cosine), over N unit vectors, measured in one
run; and the HNSW index's recall@k against the exact answer, and its build time.

    python benchmarks/search_crossover.py [--dim 512] [--sizes 1000 10000 30000 100000]

Prints one JSON line per size and the first size at which HNSW answers a query faster. Random
unit vectors: HNSW's recall on real embeddings (clustered) is at least as good.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def per_query(fn, rows) -> float:
    """Seconds per call of `fn` on each row, after one call to warm it."""
    fn(rows[0])
    start = time.perf_counter()
    for row in rows:
        fn(row)
    return (time.perf_counter() - start) / len(rows)


def main() -> None:
    from usearch.index import Index as Hnsw

    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000, 100000])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--connectivity", type=int, default=None, help="HNSW M (usearch's default: 16)")
    ap.add_argument("--expansion", type=int, default=None, help="HNSW ef for adding and searching")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    crossover = None
    for n in args.sizes:
        emb = rng.standard_normal((n, args.dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        queries = emb[rng.choice(n, args.queries, replace=False)] + 0.1 * rng.standard_normal(
            (args.queries, args.dim), dtype=np.float32
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        e, q = torch.from_numpy(emb), torch.from_numpy(queries)
        exact_top = torch.topk(q @ e.T, args.k, dim=1).indices.numpy()
        exact = per_query(lambda row, e=e: torch.topk(row[None] @ e.T, args.k, dim=1), list(q))
        start = time.perf_counter()
        tuning = {}
        if args.connectivity:
            tuning["connectivity"] = args.connectivity
        if args.expansion:
            tuning.update(expansion_add=args.expansion, expansion_search=args.expansion)
        hnsw = Hnsw(ndim=args.dim, metric="cos", dtype="f32", **tuning)
        hnsw.add(np.arange(n), emb)
        build = time.perf_counter() - start
        approx = per_query(lambda row, hnsw=hnsw: hnsw.search(row, args.k), list(queries))
        found = np.atleast_2d(hnsw.search(queries, args.k).keys)
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact_top)]))
        row = {
            "images": n,
            "dim": args.dim,
            "exact_ms": round(1000 * exact, 3),
            "hnsw_ms": round(1000 * approx, 3),
            "exact_over_hnsw": round(exact / approx, 2),
            "hnsw_recall_at_k": round(recall, 3),
            "hnsw_build_s": round(build, 2),
            **{f"hnsw_{k}": v for k, v in tuning.items()},
        }
        print(json.dumps(row), flush=True)
        if crossover is None and approx < exact:
            crossover = n
    print(json.dumps({"crossover_images": crossover, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
