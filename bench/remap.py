""""Re-map with my labels": how much better do the map and its clusters separate the classes?

    .venv/bin/python bench/remap.py --data ../shared/data/clothing-small --work /tmp/labelling-bench

The photos are built once with ``explorer build`` (as bench/labelling.py does; ``--work``
keeps the build, nothing is written into the repository, the build's own files are only
read). The first rows: the build's own map and clusters (``features auto`` may map other
vectors than the stored ones), then the same layout code on the stored vectors without
labels. A simulated person labels ``--labels`` random images per class (the true class); then
:func:`explorer.curation.remap.remap` computes the semi-supervised layout and its clusters. Printed
for the original build and each re-map, over the images NOT labelled: the NMI of the clusters
with the true classes, and the accuracy of a 10-nearest-neighbour vote on the 2-D map (how
well the map itself keeps the classes apart), with the seconds taken and the load average.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from labelling import built_vectors, load  # noqa: E402

from explorer.curation import active, remap  # noqa: E402


def knn_map_accuracy(xy: np.ndarray, truth: np.ndarray, test: np.ndarray, k: int = 10) -> float:
    """Share of ``test`` rows whose k nearest other rows on the map mostly share their class."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy[test], return_distance=False)[:, 1:]
    pred = np.array([max(set(v), key=list(v).count) for v in truth[idx]])
    return float((pred == truth[test]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/clothing-small")
    ap.add_argument("--work", default="/tmp/labelling-bench")
    ap.add_argument("--labels", type=int, nargs="+", default=[5, 20], help="labels per class")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from explorer.table import read_table

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    X, truth, csv = built_vectors(Path(a.data), work, "clothing")
    df = read_table(csv)
    xy0 = df[["x", "y"]].to_numpy(float)
    every = np.arange(len(truth))
    Xa = active.features(X)
    print(f"{len(truth):,} images, {len(set(truth))} classes ({load()})")
    print("| map | labels | clusters | NMI clusters vs classes | 10-NN accuracy on the map | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    # the same vectors, the same layout code, no labels: what the labels add
    from explorer.stages.cluster import cluster
    from explorer.stages.reduce import map_and_space

    t = time.perf_counter()
    base = map_and_space(X, random_state=remap.SEED)
    base_cl = cluster(base.space, random_state=remap.SEED).labels
    secs = time.perf_counter() - t
    print(f"| no labels (the stored vectors) | 0 | {len(set(base_cl.tolist()) - {-1})} | "
          f"{nmi(truth, base_cl):.3f} | {knn_map_accuracy(base.xy, truth, every):.3f} | {secs:.0f} |",
          flush=True)
    rng = np.random.default_rng(a.seed)
    for per in a.labels:
        picked = np.concatenate([rng.choice(np.flatnonzero(truth == c), per, replace=False)
                                 for c in sorted(set(truth))])
        rest = np.setdiff1d(every, picked)
        print(f"| original (the build) | {len(picked)} | {df['cluster'].nunique()} | "
              f"{nmi(truth[rest], df['cluster'].to_numpy()[rest]):.3f} | "
              f"{knn_map_accuracy(xy0, truth, rest):.3f} | - |")
        labels = np.full(len(truth), "", dtype=object)
        labels[picked] = truth[picked]
        keys = [str(i) for i in every]
        table, info = active.label_table(keys, labels.tolist(), ["person" if v else "" for v in labels], Xa)
        sure = table["sure"].to_numpy()
        variants = [("with my labels", labels.tolist()),
                    (f"with my labels + sure predictions ({int(sure.sum())}, "
                     f"{float((table['predicted_label'].to_numpy()[sure] == truth[sure]).mean()):.3f} right)",
                     remap.with_predictions(labels.tolist(), table["predicted_label"].tolist(), sure)),
                    ("with my labels + every prediction",
                     remap.with_predictions(labels.tolist(), table["predicted_label"].tolist(),
                                            np.ones(len(truth), bool)))]
        for name, target_labels in variants:
            targets, _ = remap.label_targets(target_labels)
            t = time.perf_counter()
            res = remap.remap(X, targets)
            secs = time.perf_counter() - t
            n_cl = len(set(res.cluster.tolist()) - {-1})
            print(f"| {name} | {len(picked)} | {n_cl} | {nmi(truth[rest], res.cluster[rest]):.3f} | "
                  f"{knn_map_accuracy(res.xy, truth, rest):.3f} | {secs:.0f} |", flush=True)
    print(f"({load()}; both scores over the images NOT labelled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
