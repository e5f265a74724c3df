"""Speed of the curation pieces (journal, labels, neighbours, hierarchy, metadata, export).

Prints medians of a few runs; asserts nothing. Synthetic embeddings stand in for real ones
(the timing depends on shape, not content); the export uses the clothing photos in place.

    .venv/bin/python bench/curation.py [--n 100000] [--dim 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

CLOTHING = Path("/work/shared/data/clothing-small")


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    warnings.simplefilter("ignore")

    from explorer.hierarchy import build_hierarchy, recluster
    from explorer.journal import Journal
    from explorer.labels import LabelBook, propose_labels
    from explorer.metadata import join_metadata, tag_values
    from explorer.neighbours import nearest, row_norms

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, a.dim)).astype(np.float32)
    truth = rng.integers(0, 50, a.n)
    X = (centres[truth] + rng.normal(scale=0.5, size=(a.n, a.dim))).astype(np.float32)
    keys = [f"dir{i % 100}/img{i:07d}.jpg" for i in range(a.n)]
    print(f"embeddings: {a.n:,} x {a.dim} float32; medians of {a.repeats} runs")

    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    try:
        # --- journal
        j = Journal(tmp / "j.labels.jsonl")
        lat = []
        for i in range(200):
            t = time.perf_counter()
            j.append({"op": "apply", "args": {"keys": [keys[i]], "label": "x"}})
            lat.append(time.perf_counter() - t)
        print(f"journal append (fsync'd), 1 key:      median {statistics.median(lat) * 1e3:.2f} ms,"
              f" max {max(lat) * 1e3:.2f} ms (200 appends)")

        book = LabelBook(Journal(tmp / "b.labels.jsonl"))
        t = time.perf_counter()
        for s in range(0, 10_000, 1000):  # 10 edits of 1,000 keys
            book.apply(keys[s:s + 1000], f"label{s // 1000}")
        print(f"LabelBook.apply 1,000 keys:            {(time.perf_counter() - t) / 10 * 1e3:.1f} ms"
              " per edit")
        t = time.perf_counter()
        book.apply(keys[: a.n // 2], "big")
        print(f"LabelBook.apply {a.n // 2:,} keys:          {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        book.undo()
        print(f"LabelBook.undo of that:                {time.perf_counter() - t:.2f} s")
        size = (tmp / "b.labels.jsonl").stat().st_size
        sec, again = timed(lambda: LabelBook.from_journal(Journal(tmp / "b.labels.jsonl")),
                           a.repeats)
        print(f"LabelBook.from_journal (12 records, {size / 1e6:.1f} MB): {sec:.2f} s")
        assert again.as_dict() == book.as_dict()
        jj = Journal(tmp / "many.labels.jsonl")
        b2 = LabelBook(jj)
        for i in range(2000):
            b2.apply([keys[i]], "l%d" % (i % 7))
        sec, _ = timed(lambda: LabelBook.from_journal(Journal(tmp / "many.labels.jsonl")),
                       a.repeats)
        print(f"LabelBook.from_journal (2,000 records): {sec * 1e3:.0f} ms")
        other = Journal(tmp / "many.labels.jsonl")
        other.replay()
        b2.apply([keys[5]], "new")
        sec, recs = timed(lambda: other.read_since(other.last_seq - 1), a.repeats)
        print(f"Journal.read_since (poll, 1 new):      {sec * 1e3:.2f} ms")

        # --- neighbours
        norms = row_norms(X)
        sec, _ = timed(lambda: nearest(X, 123, k=12), a.repeats)
        sec2, _ = timed(lambda: nearest(X, 123, k=12, norms=norms), a.repeats)
        print(f"nearest k=12 over {a.n:,}:             {sec * 1e3:.0f} ms"
              f" ({sec2 * 1e3:.0f} ms with precomputed norms)")

        labels = np.array([""] * a.n, dtype=object)
        idx = rng.choice(a.n, 1000, replace=False)
        labels[idx] = [f"c{t}" for t in truth[idx]]
        sec, prop = timed(lambda: propose_labels(X, labels, k=10), 1)
        right = (prop["proposed_label"] == [f"c{t}" for t in truth[prop["index"]]]).mean()
        print(f"propose_labels (1,000 labelled, {a.n - 1000:,} unlabelled): {sec:.1f} s,"
              f" {len(prop):,} proposals, {right:.1%} right")

        # --- hierarchy
        for n in (10_000, a.n):
            sec, tree = timed(lambda: build_hierarchy(X[:n], seed=0), 1)
            print(f"build_hierarchy {n:,} x {a.dim}:          {sec:.1f} s"
                  f" ({len(tree):,} groups, depth {tree.depth})")
        t = time.perf_counter()
        recluster(X[:50], "0", seed=0)
        recluster(X[:450], "0", seed=0)
        print(f"recluster warm-up (numba/pynndescent compile): {time.perf_counter() - t:.1f} s")
        for n in (500, 2000):
            sec, res = timed(lambda: recluster(X[:n], "3", seed=0), 1)
            print(f"recluster {n:,} images:               {sec:.1f} s ({res.n_clusters} sub-clusters)")

        # --- metadata
        df = pd.DataFrame({"path": keys, "x": 0.0, "y": 0.0})
        meta = pd.DataFrame({"file": [k.split("/")[1] for k in keys],
                             "tags": ["#a #b" if i % 2 else "c, d" for i in range(a.n)],
                             "iso": np.arange(a.n)})
        sec, (out, rep) = timed(lambda: join_metadata(df, meta, "file"), a.repeats)
        print(f"join_metadata {a.n:,} rows by file name: {sec:.2f} s (matched {rep.matched:,})")
        sec, _ = timed(lambda: tag_values(out["tags"]), a.repeats)
        print(f"tag_values {a.n:,} rows:                {sec:.2f} s")

        # --- ImageFolder export of the clothing photos
        if CLOTHING.is_dir():
            from explorer.exports import export_imagefolder

            files = sorted(p.relative_to(CLOTHING).as_posix() for p in CLOTHING.rglob("*.jpg"))
            cdf = pd.DataFrame({"path": files, "label": [f.split("/")[1] for f in files]})
            times = []
            for r in range(a.repeats):
                t = time.perf_counter()
                s = export_imagefolder(cdf, CLOTHING, tmp / f"if{r}", progress=False)
                times.append(time.perf_counter() - t)
                shutil.rmtree(tmp / f"if{r}")
            print(f"export_imagefolder {len(files):,} photos (folder): "
                  f"{statistics.median(times):.1f} s ({len(s['classes'])} classes,"
                  f" {s['renamed']} renamed)")
            t = time.perf_counter()
            export_imagefolder(cdf, CLOTHING, tmp / "ifz", as_zip=True, progress=False)
            print(f"export_imagefolder {len(files):,} photos (zip):    "
                  f"{time.perf_counter() - t:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
