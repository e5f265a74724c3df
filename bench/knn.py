"""The neighbour graph above the exact limit: faiss HNSW (the default) against pynndescent.

    python bench/knn.py --n 200000               # synthetic, prints seconds, recall, peak RSS
    python bench/knn.py --n 1000000 --methods hnsw
    python bench/knn.py --n 1000000 --sample 100000   # the map's path: sample graph + queries
    python bench/knn.py --features clothing.features.npy   # a build's own vectors

The rows are what the build hands the graph: L2-normalised, PCA-64
(:func:`explorer.stages.knn.prepare`). Synthetic rows are a two-level mixture like photo
vectors (``--groups`` groups of ``--blobs`` blobs each, generated in chunks). Recall is
measured on 2,000 seeded rows against their exact neighbours. Each method runs in a fresh
process, so the figures include what a build pays the first time (pynndescent compiles
with numba: its kernels are cached on disk after the first run on a machine, ``nn_descent``
itself is compiled in every process). Nothing is asserted; the figures go into
docs/building.md with ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def rows(n: int, groups: int, blobs: int, seed: int, d: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(groups, d)).astype(np.float32)
    centres = (top[np.repeat(np.arange(groups), blobs)]
               + 0.5 * rng.normal(size=(groups * blobs, d))).astype(np.float32)
    X = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        b = min(a + 100_000, n)
        X[a:b] = centres[rng.integers(0, len(centres), b - a)] + 0.5 * rng.normal(size=(b - a, d))
    return X


def _nndescent(X: np.ndarray, k: int, compressed: bool = True):
    """pynndescent's index as ``explorer.stages.knn`` made it until 2026-12-07 (unseeded)."""
    from pynndescent import NNDescent

    n = len(X)
    return NNDescent(X, n_neighbors=k, metric="euclidean",
                     n_trees=min(64, 5 + int(round(n ** 0.5 / 20.0))),
                     n_iters=max(5, int(round(np.log2(n)))), low_memory=True, n_jobs=-1,
                     compressed=compressed, verbose=False)


def one(method: str, path: str, k: int, seed: int, sample: int) -> dict:
    """Run in a child: the graph of the prepared rows in ``path`` by ``method`` (with
    ``sample``: the graph of the first ``sample`` rows and the others' ``k - 1`` nearest
    of them, as the map of a large build does)."""
    from explorer.stages import knn

    Xp = np.load(path, mmap_mode="r")
    Xp = np.ascontiguousarray(Xp)
    t = time.perf_counter()
    c = time.process_time()
    if sample:
        base, rest, qk = Xp[:sample], Xp[sample:], k - 1
        if method == "hnsw":
            _, idx, _ = knn.graph_and_nearest(base, k, rest, qk, method="hnsw")
        else:  # before 2026-12-07: pynndescent's index for the graph, then its search
            index = _nndescent(base, k, compressed=False)
            index.neighbor_graph
            index.prepare()
            idx = np.concatenate([index.query(rest[a:a + 65536], k=qk, epsilon=0.2)[0]
                                  for a in range(0, len(rest), 65536)])
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pick = np.random.default_rng(seed).choice(len(rest), 2000, replace=False)
        truth, _ = knn.query(base, rest[pick], qk, metric="euclidean")
        recall = float(np.mean([len(set(a) & set(b)) / qk for a, b in zip(idx[pick], truth)]))
        return {"method": method, "sample": sample, "queries": len(rest),
                "seconds": round(wall, 1), "cpu_s": round(cpu, 1),
                "query_recall": round(recall, 4), "peak_rss_mb": round(rss)}
    if method == "hnsw":
        g = knn.knn_graph(Xp, k, method="hnsw")
        idx = g.indices
    else:  # the method the build used before 2026-12-07
        index = _nndescent(Xp, k)
        idx = np.asarray(index.neighbor_graph[0])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the recall's search
    sample = np.random.default_rng(seed).choice(len(Xp), min(2000, len(Xp)), replace=False)
    truth, _ = knn.query(Xp, Xp[sample], k, metric="euclidean")
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx[sample], truth)]))
    return {"method": method, "seconds": round(wall, 1), "cpu_s": round(cpu, 1),
            "recall": round(recall, 4),
            "peak_rss_mb": round(rss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--features", help=".npy of a build's vectors instead of synthetic rows")
    ap.add_argument("--k", type=int, default=31, help="neighbours incl. the point (the build's)")
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--blobs", type=int, default=60)
    ap.add_argument("--methods", default="hnsw,nndescent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=0,
                    help="graph of this many rows, the others queried against them (the map's "
                         "path above 100,000 images)")
    ap.add_argument("--work", default="/tmp/bench-knn")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child[0], a.child[1], a.k, a.seed, a.sample)))
        return
    from explorer.stages import knn

    os.makedirs(a.work, exist_ok=True)
    X = np.load(a.features) if a.features else rows(a.n, a.groups, a.blobs, a.seed)
    Xp, _ = knn.prepare(X, metric="cosine", pca_dims=64)
    path = os.path.join(a.work, "prepared.npy")
    np.save(path, Xp)
    del X, Xp
    print(f"rows {np.load(path, mmap_mode='r').shape}, "
          f"k {a.k}, load {os.getloadavg()}", flush=True)
    for m in a.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--k", str(a.k), "--seed", str(a.seed),
                              "--sample", str(a.sample), "--child", m, path],
                             capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
        print(line, flush=True)
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
