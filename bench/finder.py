"""Figures of the app's Find tab (explorer/app/finder.py): search by words and the flag filter.

    PYTHONPATH=. python bench/finder.py [--rows 1000000] [--like-rows 200000] [--repeats 5]

Prints the median seconds of: the first word query of a process (loads the sentence model
and the class-name vectors), a warm word query over ``--rows`` synthetic concept rows (the
top-5 ImageNet classes per image, as NAME.concepts.npz holds them), "more like this" over
``--like-rows`` x 1280 float16 embeddings (memory-mapped, as NAME.features.npy), the flag filter's
mask and the cluster names over ``--rows`` rows; with ``os.getloadavg()``.

Measured 2026-12-01 on the shared 2-core machine (load average 8.6 / 9.3 / 9.6), ``--rows
1000000 --like-rows 200000 --repeats 5``: first query setup 5.25 s (model + cached class
vectors); word query 0.221 s (0.791 s with torch's default two threads); more like this
2.09 s (200k rows); flag mask 0.042 s; flag counts 0.054 s; cluster names 0.985 s (once
per process). The full suite ran at the same time as other work: figures are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--like-rows", type=int, default=200_000, help="rows of the embedding file")
    args = ap.parse_args()
    from explorer.app import finder as F
    from explorer.curation.search import query_scores
    from explorer.stages.neighbours import nearest, row_norms

    n, rng = args.rows, np.random.default_rng(0)
    t = time.perf_counter()
    encoder, class_vecs = F.text_model()
    print(f"first query setup (sentence model + class-name vectors): {time.perf_counter() - t:.2f} s")
    idx = rng.integers(0, 1000, size=(n, 5))
    p = np.sort(rng.dirichlet(np.ones(6), size=n)[:, :5].astype(np.float32), axis=1)[:, ::-1]
    allowed = rng.random(n) > 0.05

    def word():
        with F._one_torch_thread():  # as SearchIndex.words runs it
            scores, _ = query_scores("a red dress", idx, p, class_vecs, encoder)
        F.top_rows(scores, allowed, 40)

    def word_default_threads():
        scores, _ = query_scores("a red dress", idx, p, class_vecs, encoder)
        F.top_rows(scores, allowed, 40)

    print(f"word query, {n:,} rows, top 40 (median of {args.repeats}): {timed(word, args.repeats):.3f} s")
    print(f"  the same with torch's default threads: {timed(word_default_threads, args.repeats):.3f} s")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "features.npy"
        m = args.like_rows
        X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(m, 1280))
        for lo in range(0, m, 100_000):
            X[lo:lo + 100_000] = rng.normal(size=(min(100_000, m - lo), 1280)).astype(np.float16)
        X.flush()
        del X
        def like_search(feats=np.load(path, mmap_mode="r")):
            norms = row_norms(feats)
            return timed(lambda: nearest(feats, 123, k=40, norms=norms), args.repeats)

        print(f"more like this, {m:,} x 1280 float16 memory-mapped (median of {args.repeats}): "
              f"{like_search():.3f} s")
    flags = pd.DataFrame({f: (rng.random(n) < 0.03).astype(int) for f in ("blurry", "dark", "grayscale")})
    keep = timed(lambda: F.flag_keep(flags, ["blurry", "dark"], "hide"), args.repeats)
    print(f"flag filter mask, {n:,} rows (median of {args.repeats}): {keep:.3f} s")
    counts = timed(lambda: F.flag_counts(flags), args.repeats)
    print(f"flag counts, {n:,} rows (median of {args.repeats}): {counts:.3f} s")
    cl = rng.integers(-1, 500, size=n).astype(str).astype(object)
    names = pd.Series(np.where(cl == "-1", "noise", "c" + cl.astype(str)))
    print(f"cluster names, {n:,} rows (median of {args.repeats}): "
          f"{timed(lambda: F.cluster_names(cl, names), args.repeats):.3f} s")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
