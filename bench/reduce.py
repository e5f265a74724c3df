"""Map + cluster at scale: synthetic 1280-d vectors through map_and_space and cluster.

    python bench/reduce.py --n 100000            # prints per-step seconds and peak RSS
    python bench/reduce.py                       # 1,000,000 points (the goal: completes, < 12 GB)
    python bench/reduce.py --quality clothing.npz  # NMI/ARI/noise: old path vs new defaults

The data is a two-level mixture, like photo embeddings: ``--groups`` groups, each with
``--blobs-per-group`` blobs (``groups * blobs_per_group`` blobs in all, a few thousand
by default), generated in chunks as float32 so the only full-size array is the input.
Peak RSS is the process's high-water mark (``ru_maxrss``) after each step. Nothing is
asserted; the figures go into the closing note with ``os.getloadavg()``.

``--quality FILE.npz`` (``X`` (N, D) and ``labels`` (N,), e.g. the clothing photos'
features) compares, against the labels, the previous default (two separate seeded
UMAPs via ``reduce_cluster_space`` + hdbscan) with ``map_and_space`` + ``cluster`` for
each HDBSCAN backend, over ``--seeds``.

Above ``FIT_POINTS`` (100,000) rows ``map_and_space`` fits the graph and both UMAPs on a
seeded sample of 100,000 rows and places the others among their nearest sampled rows
(one index builds the sample's graph and answers the other rows' queries: faiss HNSW since
2026-12-07, pynndescent in the figures below; bench/knn.py compares the two).

Measured 2026-12-01 16:20-17:11 with that, same machine, load average 6-12 (four
sessions), this process at nice 0 after 10 minutes at nice 19/10:

* ``--n 1000000``: generate 248 s, peak RSS 5.22 GB; prepare (NaN check, normalise,
  PCA-64) 225 s; kNN (pynndescent on the 100k sample, including its first-call compile,
  plus 900k queries against it at epsilon 0.1; the default is now 0.2, which searches
  wider) 642 s; 5-D space 704 s; 2-D map 158 s; placing 900k
  rows 7.3 s; map+space 1,765 s, peak RSS 6.63 GB (the input alone is 4.9 GB); cluster
  (fast_hdbscan, min_cluster_size 20,000, min_samples 100, 31% noise assigned) 1,012 s;
  15 clusters for the 50 groups: NMI 0.701, ARI 0.328. Whole run 50.6 min wall, 16.9
  CPU-minutes (user 958 s + system 55 s: 33% of one core on average), maximum RSS 6.95 GB
  (``/usr/bin/time -v``); the goal was "completes, < 12 GB". Load average 6.3 at the start,
  8.6 at the end.

Before (all rows fitted), measured 2026-12-01 on the shared 2-core machine (load average
8-18: seven sessions at once, so this process had a fraction of a core):

* ``--n 100000`` (unseeded, parallel): generate 21 s; prepare (normalise + PCA-64)
  37 s; kNN (pynndescent, includes its first-call compile) 294 s; 5-D space (spectral
  init) 927 s; 2-D map 473 s; map+space 1,737 s; cluster (fast_hdbscan,
  min_cluster_size 2,000, min_samples 100, 42% noise assigned) 153 s; peak RSS 1.77 GB.
  13 clusters for the 50 groups: NMI 0.651, ARI 0.259.
* ``--n 1000000``: generate 276 s, peak RSS 5.25 GB (the input alone is 4.9 GB);
  map_and_space had not finished after 36 more minutes (stopped at the session's
  deadline; peak RSS by then 9.1 GB, under the 12 GB goal). Largest n that finished:
  100,000.
* ``--quality`` clothing (3,781 x 1280 lite0 features, seeds 42-44, medians): before
  (two seeded UMAPs + hdbscan) NMI 0.632 ARI 0.562, 0% noise, 10 clusters;
  map_and_space (full dimension, exact kNN) + hdbscan NMI 0.630 ARI 0.564, 10 clusters;
  with PCA-64 first NMI 0.614 ARI 0.504 (fast_hdbscan 0.611 / 0.508); with PCA-128 0.622.
  HDBSCAN's own noise before assignment: 29% (hdbscan), 35% (fast_hdbscan).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GB


def synthetic(n: int, d: int, groups: int, per_group: int, seed: int = 0,
              chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X (n, d) float32, group (n,), blob (n,)): blob centres = group centre + offset."""
    rng = np.random.default_rng(seed)
    g_centres = rng.standard_normal((groups, d), dtype=np.float32)
    b_offsets = 0.6 * rng.standard_normal((groups * per_group, d), dtype=np.float32)
    blob = rng.integers(0, groups * per_group, size=n)
    group = blob // per_group
    X = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        X[a:b] = rng.standard_normal((b - a, d), dtype=np.float32)
        X[a:b] *= 0.5
        X[a:b] += g_centres[group[a:b]]
        X[a:b] += b_offsets[blob[a:b]]
    return X, group, blob


def run_scale(args) -> None:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from explorer.stages.cluster import cluster
    from explorer.stages.reduce import map_and_space

    print(f"load average at start: {os.getloadavg()}", flush=True)
    t = time.perf_counter()
    X, group, blob = synthetic(args.n, args.dim, args.groups, args.blobs_per_group)
    print(f"generate   {time.perf_counter() - t:8.1f} s   peak RSS {peak_rss_gb():5.2f} GB   "
          f"({args.n:,} x {args.dim}, {args.groups * args.blobs_per_group:,} blobs in "
          f"{args.groups} groups)", flush=True)
    t = time.perf_counter()
    res = map_and_space(X, map_method=args.map, random_state=args.seed, device=args.device)
    total = time.perf_counter() - t
    for step, sec in res.info["timings"].items():
        if step != "total":
            print(f"{step:10s} {sec:8.1f} s", flush=True)
    print(f"map+space  {total:8.1f} s   peak RSS {peak_rss_gb():5.2f} GB   "
          f"knn={res.info['knn_method']} init={res.info['init']} pca={res.info['pca_dims']} "
          f"fitted={res.info.get('fit_points')} "
          f"parallel={res.info['parallel']} threads={res.info.get('threads')}", flush=True)
    del X
    t = time.perf_counter()
    cres = cluster(res.space, "hdbscan", random_state=args.seed)
    print(f"cluster    {time.perf_counter() - t:8.1f} s   peak RSS {peak_rss_gb():5.2f} GB   "
          f"{cres.n_clusters} clusters, backend={cres.params.get('backend')}, "
          f"min_cluster_size={cres.params.get('min_cluster_size')}, "
          f"min_samples={cres.params.get('min_samples')}", flush=True)
    raw_noise = next((s for s in cres.notes if "noise point" in s), "no HDBSCAN noise")
    print(f"groups: NMI {normalized_mutual_info_score(group, cres.labels):.3f} "
          f"ARI {adjusted_rand_score(group, cres.labels):.3f}; {raw_noise}")
    print(f"load average at end: {os.getloadavg()}")


def run_quality(args) -> None:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from explorer.stages.cluster import cluster
    from explorer.stages.reduce import map_and_space, reduce_cluster_space

    z = np.load(args.quality, allow_pickle=True)
    X, truth = z["X"].astype(np.float32), z["labels"]
    print(f"{args.quality}: {X.shape[0]:,} x {X.shape[1]}, {len(set(truth.tolist()))} classes; "
          f"load average {os.getloadavg()}")
    rows: dict[str, list] = {}

    def record(name, labels, sec):
        rows.setdefault(name, []).append((
            normalized_mutual_info_score(truth, labels), adjusted_rand_score(truth, labels),
            float((labels < 0).mean()), len(set(labels.tolist()) - {-1}), sec))

    for seed in args.seeds:
        t = time.perf_counter()
        Z, _ = reduce_cluster_space(X, random_state=seed)
        lab = cluster(Z, "hdbscan", random_state=seed, backend="hdbscan").labels
        record("before: reduce_cluster_space + hdbscan", lab, time.perf_counter() - t)
        t = time.perf_counter()
        res = map_and_space(X, random_state=seed)
        t_map = time.perf_counter() - t
        for backend in ("hdbscan", "fast_hdbscan"):
            t = time.perf_counter()
            lab = cluster(res.space, "hdbscan", random_state=seed, backend=backend).labels
            record(f"after: map_and_space + {backend}", lab, t_map + time.perf_counter() - t)
            lab = cluster(res.space, "hdbscan", random_state=seed, backend=backend,
                          assign_noise=False).labels
            record(f"after: ... {backend}, raw noise kept", lab, 0.0)
    print(f"medians over seeds {args.seeds}:")
    for name, vals in rows.items():
        med = [statistics.median(v[i] for v in vals) for i in range(5)]
        print(f"  {name:42s} NMI {med[0]:.3f}  ARI {med[1]:.3f}  noise {med[2]:.1%}  "
              f"clusters {med[3]:.0f}  {med[4]:.1f} s")
    print(f"load average at end: {os.getloadavg()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--blobs-per-group", type=int, default=60)
    ap.add_argument("--map", default="umap", choices=("umap", "tsne", "pca"))
    ap.add_argument("--seed", type=int, default=None, help="default: parallel, unseeded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quality", type=Path, help=".npz with X and labels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = ap.parse_args(argv)
    if args.quality:
        run_quality(args)
    else:
        run_scale(args)


if __name__ == "__main__":
    main()
