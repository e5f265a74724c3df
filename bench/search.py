"""Precision@5 of ``explorer search`` by words (search by concept) and by image.

Builds (``explorer.stages.pipeline.build``) a labelled set of crops of scikit-image's sample photos
(tests/_collections.py ``photos``: random crops, colour jitter, flips), then asks labelled
queries and counts how many of the top 5 show what was asked:

- text: "a cat" -> the chelsea crops, "a cup of coffee" -> coffee, "a rocket" -> rocket, ...
  (queries for things ImageNet has no class for, e.g. "an astronaut", are reported too:
  search by concept cannot find them, and the figures say so);
- image: a held-out crop of each photo (not in the build) -> crops of the same photo.

    python bench/search.py [--per-class 20] [--seed 7]

Nothing is asserted; figures and the load average are printed.

Measured (120 crops of 6 photos, load average 17): text P@5 1.00 for "a cat", "a cup of
coffee", "a rocket", "a space rocket on the launch pad"; 0.00 for "an astronaut", "galaxies
in the night sky", "a microscope image of tissue" (no ImageNet class: read as space
shuttle / planetarium / consomme); mean 0.57. Image search P@5 1.00 for all 6 photos.
Run again on 1 Dec 2026 (load average 9.8): the same precision (text mean 0.57, image
1.00); build of the 120 crops 82.6 s, median seconds per query 1.09 (text), 2.95 (image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: query -> the photo its results should come from
TEXT_QUERIES = {
    "a cat": "chelsea",
    "a cup of coffee": "coffee",
    "a rocket": "rocket",
    "a space rocket on the launch pad": "rocket",
    "an astronaut": "astronaut",
    "galaxies in the night sky": "hubble_deep_field",
    "a microscope image of tissue": "immunohistochemistry",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)

    from tests import _collections as C

    from explorer.stages.pipeline import build
    from explorer.curation.search import search

    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        tmp = Path(tmp)
        images, labels = C.photos(args.per_class, seed=args.seed)
        C.write_folder(images, labels, tmp / "imgs", ext="jpg")
        # held-out queries: other crops of the same photos
        q_images, q_labels = C.photos(1, seed=args.seed + 1000)
        queries = C.write_folder(q_images, q_labels, tmp / "queries", ext="jpg")
        t0 = time.perf_counter()
        res = build(tmp / "imgs", app=tmp / "app", seed=args.seed, features="cnn",
                    progress=False)
        print(f"build of {len(res.table)} images ({len(set(labels))} photos): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        csv = res.csv_path

        def label_of(path: str) -> str:
            return path.split("/")[0]

        print(f"\nsearch by concept (precision@{args.top})")
        text_p, secs = [], []
        for q, want in TEXT_QUERIES.items():
            t0 = time.perf_counter()
            hits = search(csv, q, top=args.top)
            secs.append(time.perf_counter() - t0)
            p = sum(label_of(h["path"]) == want for h in hits) / args.top
            text_p.append(p)
            read = ", ".join(hits[0].get("query_read_as", [])) if hits else ""
            print(f"  {q!r:<38} -> {want:<22} P@{args.top} {p:.2f}  (read as: {read}; "
                  f"{secs[-1]:.1f} s)", flush=True)
        print(f"  mean P@{args.top} {statistics.mean(text_p):.2f}, median seconds per query "
              f"{statistics.median(secs):.2f} (the first one encodes the class names)")

        print(f"\nsearch by image (precision@{args.top}, held-out crop of each photo)")
        img_p, secs = [], []
        for path, want in zip(queries, q_labels):
            t0 = time.perf_counter()
            hits = search(csv, image=path, top=args.top)
            secs.append(time.perf_counter() - t0)
            p = sum(label_of(h["path"]) == want for h in hits) / args.top
            img_p.append(p)
            print(f"  {want:<22} P@{args.top} {p:.2f}  ({secs[-1]:.1f} s)", flush=True)
        print(f"  mean P@{args.top} {statistics.mean(img_p):.2f}, median seconds per query "
              f"{statistics.median(secs):.2f}")
    print(f"\nload average (1, 5, 15 min): {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
