"""Clustering quality against folder labels (folder name = class).

Prints ARI, NMI, noise fraction and cluster count for the default build and, with
``--all-methods``, for every ``--cluster`` choice. Figures are medians over ``--seeds``.

Three ways to get embeddings:

    # the real thing: a default build through the pipeline (embeds every image)
    python bench/quality.py --data /work/shared/data/clothing-small --all-methods

    # reuse a build's CSV and its NAME.features.npy (no embedding)
    python bench/quality.py --csv /tmp/clothing/clothing.csv --all-methods

    # a features file: .npz with X (N, D) and labels (N,) (paths optional)
    python bench/quality.py --features /tmp/h2/clothing_feats.npz --all-methods

The class of an image is the name of the folder that holds it (``train/hat/x.jpg`` ->
``hat``). Nothing is asserted: this prints figures for the developers' guide's targets
(default: NMI >= 0.60 and noise <= 10% on clothing-small).

Measured (2 shared cores, tf_efficientnet_lite0 features, 3,781 photos, 10 classes):
default build (seed 42) ARI 0.558, NMI 0.632, noise 0%, 10 clusters. From features,
medians of seeds 42-44: hdbscan (default) 0.564 / 0.629 / 0% / 10; kmeans (elbow)
0.283 / 0.485 / 3 clusters; agglomerative (silhouette) 0.051 / 0.219 / 2; dbscan
0.392 / 0.574 / 3.1% noise / 11; gmm (BIC) 0.351 / 0.558 / 20; auto (picked kmeans
k=10-11) 0.588 / 0.628 / 10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path("/work/shared/data/clothing-small")
ALL_METHODS = ("hdbscan", "kmeans", "agglomerative", "dbscan", "gmm", "auto")


def folder_labels(paths) -> np.ndarray:
    """Class of each image = the name of its parent folder."""
    return np.array([Path(str(p)).parent.name for p in paths])


def measure(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels)
    return {
        "ARI": float(adjusted_rand_score(truth, labels)),
        "NMI": float(normalized_mutual_info_score(truth, labels)),
        "noise": float((labels == -1).mean()) if len(labels) else 0.0,
        "clusters": float(len(set(labels.tolist()) - {-1})),
    }


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def print_table(title: str, rows: list[tuple[str, dict[str, float], float]]) -> None:
    print(f"\n{title}")
    print(f"{'method':<30} {'ARI':>6} {'NMI':>6} {'noise':>7} {'clusters':>9} {'time s':>8}")
    for name, m, secs in rows:
        print(
            f"{name:<30} {m['ARI']:6.3f} {m['NMI']:6.3f} {m['noise']:7.1%} "
            f"{m['clusters']:9.0f} {secs:8.1f}"
        )
    sys.stdout.flush()


def methods_on_features(
    X: np.ndarray, truth: np.ndarray, methods, seeds, extra: dict | None = None
) -> list[tuple[str, dict[str, float], float]]:
    """Clustering space once per seed, then each method on it (as the pipeline does)."""
    from explorer.cluster import cluster
    from explorer.reduce import reduce_cluster_space

    per: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    secs: dict[str, list[float]] = {m: [] for m in methods}
    picked: dict[str, list[str]] = {m: [] for m in methods}
    for seed in seeds:
        t0 = time.perf_counter()
        Z, notes = reduce_cluster_space(X, random_state=seed)
        t_space = time.perf_counter() - t0
        print(f"  seed {seed}: clustering space {Z.shape} in {t_space:.1f} s", flush=True)
        for m in methods:
            t0 = time.perf_counter()
            res = cluster(Z, m, random_state=seed, **(extra or {}).get(m, {}))
            secs[m].append(time.perf_counter() - t0 + t_space)
            per[m].append(measure(truth, res.labels))
            if m == "auto":
                picked[m].append(f"{res.method} {res.params.get('k', '')}".strip())
            print(f"    {m:<14} {per[m][-1]}  ({secs[m][-1]:.1f} s)", flush=True)
    rows = []
    for m in methods:
        name = m if not picked[m] else f"auto -> {', '.join(sorted(set(picked[m])))}"
        if m == "hdbscan":
            name = "hdbscan (the default)"
        rows.append((name[:30], median_row(per[m]), statistics.median(secs[m])))
    return rows


def from_build(data: Path, seeds, workdir: Path, progress: bool):
    """Default builds through explorer.pipeline.build; returns rows and the features."""
    from explorer.pipeline import build

    rows, feats, truth = [], None, None
    per, secs = [], []
    for seed in seeds:
        out = workdir / f"seed{seed}" / "clothing.csv"
        t0 = time.perf_counter()
        res = build(data, out=out, seed=seed, progress=progress)
        secs.append(time.perf_counter() - t0)
        df = res.table
        truth = folder_labels(df["path"])
        per.append(measure(truth, df["cluster"].to_numpy()))
        print(f"  build seed {seed}: {per[-1]}  ({secs[-1]:.1f} s)", flush=True)
        fpath = Path(res.csv_path).with_name(Path(res.csv_path).stem + ".features.npy")
        if fpath.is_file():
            feats = np.load(fpath)
    rows.append(("default build (pipeline)", median_row(per), statistics.median(secs)))
    return rows, feats, truth


def load_features(path: Path):
    with np.load(path, allow_pickle=False) as f:
        X = np.asarray(f["X"], dtype=np.float32)
        if "labels" in f:
            truth = np.asarray(f["labels"]).astype(str)
        else:
            truth = folder_labels(f["paths"])
    return X, truth


def load_csv(path: Path):
    from explorer.table import read_table

    df = read_table(path)
    fpath = path.with_name(path.stem + ".features.npy")
    if not fpath.is_file():
        raise SystemExit(f"{fpath} not found (a build writes it beside the CSV)")
    X = np.load(fpath)
    return X, folder_labels(df["path"]), df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=None, help=f"image folder (default {DEFAULT_DATA})")
    src.add_argument("--csv", type=Path, help="an existing build's CSV (with NAME.features.npy)")
    src.add_argument("--features", type=Path, help=".npz with X and labels (or paths)")
    ap.add_argument("--all-methods", action="store_true", help="also every --cluster choice")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list for --all-methods")
    ap.add_argument("--seeds", default="42", help="comma list of seeds; figures are medians")
    ap.add_argument("--workdir", type=Path, default=None, help="where builds go (default: a temp dir)")
    ap.add_argument("--progress", action="store_true", help="show the pipeline's progress bars")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")

    rows: list = []
    if args.features is not None:
        X, truth = load_features(args.features)
        source = f"features {args.features} {X.shape}"
        print(f"{source}, {len(set(truth))} classes", flush=True)
        # the default is hdbscan on the clustering space; with --all-methods it is the
        # hdbscan row of that table (one UMAP per seed, not two)
        if not args.all_methods:
            rows += [
                (f"default ({name})", m, s)
                for name, m, s in methods_on_features(X, truth, ["hdbscan"], seeds)
            ]
        elif "hdbscan" not in methods:
            methods = ["hdbscan"] + methods
    elif args.csv is not None:
        X, truth, df = load_csv(args.csv)
        source = f"csv {args.csv} {X.shape}"
        rows.append(("csv as built", measure(truth, df["cluster"].to_numpy()), float("nan")))
    else:
        data = args.data or DEFAULT_DATA
        source = f"build of {data}"
        with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
            workdir = args.workdir or Path(tmp)
            built, X, truth = from_build(data, seeds, workdir, args.progress)
        rows += built
        if X is None and args.all_methods:
            print("the build wrote no features file; cannot run --all-methods", file=sys.stderr)
            args.all_methods = False
    if args.all_methods:
        rows += methods_on_features(X, truth, methods, seeds)
    n_seeds = f"median of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    print_table(f"Quality vs folder labels: {source}, {len(truth)} images, "
                f"{len(set(truth))} classes ({n_seeds})", rows)
    print("target (default): NMI >= 0.60 and noise <= 10%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
