"""Speed of the curation pieces (label journal, labels; with --all also neighbours,
hierarchy, metadata, export).

Prints medians of a few runs and the load average; asserts nothing. Synthetic keys and
embeddings stand in for real ones (the timing depends on sizes, not content); the export
uses the clothing photos in place.

    .venv/bin/python bench/curation.py [--n 100000] [--repeats 5] [--all [--dim 512]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

CLOTHING = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clothing-small"


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _written() -> int:
    """Bytes this process handed to write() so far (Linux; -1 elsewhere)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def bench_journal(tmp: Path, keys: list[str], repeats: int) -> None:
    from explorer.curation.journal import Journal
    from explorer.curation.labels import LabelBook, LabelState

    n = len(keys)
    known = frozenset(keys)
    print(f"load average before: {tuple(round(x, 2) for x in os.getloadavg())}")

    # one committed edit (1 key): BEGIN IMMEDIATE, insert, upsert, COMMIT with synchronous=FULL
    path = tmp / "one.labels.sqlite"
    book = LabelBook(Journal(path, session="A"), keys=known)
    lat = []
    for i in range(200):
        t = time.perf_counter()
        book.apply([keys[i]], "x" if i % 2 else "y")
        lat.append(time.perf_counter() - t)
    print(f"one committed edit (1 key, LabelBook.apply): median {statistics.median(lat) * 1e3:.2f} ms,"
          f" max {max(lat) * 1e3:.2f} ms (200 edits)")

    # labelling every key in one edit, and its undo
    path = tmp / "big.labels.sqlite"
    book = LabelBook(Journal(path, session="A"), keys=known)
    book.apply(keys[:1], "warm")
    other = LabelBook(Journal(path, session="B"), keys=known,
                      state=LabelState(Journal(path, session="B-reader")))  # as in another process
    shared = LabelBook(Journal(path, session="C"), keys=known)  # another tab in this process
    size0, w0 = _files_size(path), _written()
    t = time.perf_counter()
    book.apply(keys, "big")
    sec = time.perf_counter() - t
    size1, w1 = _files_size(path), _written()
    import sqlite3

    conn = sqlite3.connect(path)
    stored = conn.execute("SELECT length(payload) FROM events ORDER BY seq DESC LIMIT 1").fetchone()[0]
    conn.close()
    payload = Journal(path).record(Journal(path).last_seq)
    pbytes = len(json.dumps(payload["args"], separators=(",", ":")))
    print(f"label {n:,} keys in one edit: {sec * 1e3:.0f} ms; bytes written {w1 - w0:,}"
          f" (database+WAL grew {size1 - size0:,}; the record: {pbytes:,} bytes of JSON,"
          f" {stored:,} stored)")
    t = time.perf_counter()
    changed = other.sync()
    sec = time.perf_counter() - t
    print(f"another process's session catching up on that edit: {sec * 1e3:.0f} ms"
          f" ({len(changed):,} keys changed)")
    t = time.perf_counter()
    changed = shared.sync()
    print(f"another session in this process (shared LabelState) catching up: "
          f"{(time.perf_counter() - t) * 1e3:.1f} ms ({len(changed):,} keys)")
    lat = []
    for _ in range(repeats):
        t = time.perf_counter()
        other.sync()
        lat.append(time.perf_counter() - t)
    print(f"a poll with nothing new (sync): median {statistics.median(lat) * 1e3:.2f} ms")
    t = time.perf_counter()
    book.undo()
    print(f"undo of that edit: {(time.perf_counter() - t) * 1e3:.0f} ms")
    book.redo()

    # memory: 20 more sessions on that journal (every key labelled), as the app opens them
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    books = [LabelBook.from_journal(Journal(path, session=f"s{i}"), keys=known) for i in range(20)]
    for b in books:
        b.sync()
    per = (tracemalloc.get_traced_memory()[0] - base) / len(books)
    tracemalloc.stop()
    print(f"memory per extra session on {n:,} labelled keys (shared LabelState): {per / 1e3:.1f} kB")
    del books

    # opening a journal of 1,000 edits (a new server process: state + this session's stacks)
    path = tmp / "many.labels.sqlite"
    book = LabelBook(Journal(path, session="A"), keys=known)
    for i in range(1000):
        book.apply(keys[i * 50:(i + 1) * 50], f"l{i % 7}")
    def fresh():
        return LabelBook.from_journal(Journal(path, session="A"), keys=known,
                                      state=LabelState(Journal(path, session="reader")))
    sec, again = timed(fresh, repeats)
    assert again.as_dict() == book.as_dict() and len(again._undo) == 1000
    print(f"open a journal of 1,000 edits (50 keys each) in a new process: median {sec * 1e3:.0f} ms")

    # carrying an old .jsonl journal of 1,000 edits over (once)
    old = tmp / "legacy.labels.jsonl"
    with open(old, "w") as fh:
        for i in range(1000):
            ks = keys[i * 50:(i + 1) * 50]
            fh.write(json.dumps({"seq": i + 1, "ts": "2025-01-01T00:00:00+00:00", "session": "old",
                                 "op": "apply", "args": {"keys": ks, "label": f"l{i % 7}",
                                 "changes": {k: ["", f"l{i % 7}"] for k in ks}}}) + "\n")
    t = time.perf_counter()
    imported = LabelBook.from_journal(Journal(old.with_suffix(".sqlite")), keys=known)
    print(f"import an old .jsonl of 1,000 edits ({old.stat().st_size / 1e6:.1f} MB) on first open:"
          f" {(time.perf_counter() - t) * 1e3:.0f} ms ({len(imported):,} labelled)")
    print(f"load average after: {tuple(round(x, 2) for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--all", action="store_true",
                    help="also neighbours, propagation, hierarchy, metadata and export")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    keys = [f"dir{i % 100}/img{i:07d}.jpg" for i in range(max(a.n, 50_000))]

    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    try:
        bench_journal(tmp, keys[: a.n] if a.n >= 50_000 else keys, a.repeats)
        if a.all:
            bench_rest(tmp, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_rest(tmp: Path, a) -> None:
    from explorer.stages.hierarchy import build_hierarchy, recluster
    from explorer.curation.labels import propose_labels
    from explorer.stages.metadata import join_metadata, tag_values
    from explorer.stages.neighbours import nearest, row_norms

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, a.dim)).astype(np.float32)
    truth = rng.integers(0, 50, a.n)
    X = (centres[truth] + rng.normal(scale=0.5, size=(a.n, a.dim))).astype(np.float32)
    keys = [f"dir{i % 100}/img{i:07d}.jpg" for i in range(a.n)]
    print(f"embeddings: {a.n:,} x {a.dim} float32; medians of {a.repeats} runs")
    if True:
        # --- neighbours
        norms = row_norms(X)
        sec, _ = timed(lambda: nearest(X, 123, k=12), a.repeats)
        sec2, _ = timed(lambda: nearest(X, 123, k=12, norms=norms), a.repeats)
        print(f"nearest k=12 over {a.n:,}:             {sec * 1e3:.0f} ms"
              f" ({sec2 * 1e3:.0f} ms with precomputed norms)")

        labels = np.array([""] * a.n, dtype=object)
        m = min(1000, a.n // 2)  # fewer where --n is small
        idx = rng.choice(a.n, m, replace=False)
        labels[idx] = [f"c{t}" for t in truth[idx]]
        sec, prop = timed(lambda: propose_labels(X, labels, k=10), 1)
        right = (prop["proposed_label"] == [f"c{t}" for t in truth[prop["index"]]]).mean()
        print(f"propose_labels ({m:,} labelled, {a.n - m:,} unlabelled): {sec:.1f} s,"
              f" {len(prop):,} proposals, {right:.1%} right")

        # --- hierarchy
        for n in sorted({min(10_000, a.n), a.n}):
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
            from explorer.curation.exports import export_imagefolder

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


if __name__ == "__main__":
    main()
