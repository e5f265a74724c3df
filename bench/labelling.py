"""A simulated person labels what the tool asks for; how good are the tool's predictions?

    .venv/bin/python bench/labelling.py --data ../shared/data/clothing-small --work /tmp/labelling-bench
    .venv/bin/python bench/labelling.py --shapes                 # also the non-photographs
    .venv/bin/python bench/labelling.py --scale 1000000          # next/propagate timings only
    .venv/bin/python bench/labelling.py --jitter 0.01 --seeds 15 # how far the medians move by chance
    .venv/bin/python bench/labelling.py --model tf_efficientnet_lite2 --work /tmp/labelling-lite2

The photos are built once with ``explorer build`` (lite0 vectors, or ``--model``'s; ``--work``
keeps the build between runs, so give each model its own; nothing is written into the
repository). The person answers with the true class
(the photo's folder name). In rounds of ``--round`` labels, up to ``--max-labels``, for
``--seeds`` seeds, two ways of choosing what to label: the tool's picks
(:func:`explorer.curation.active.pick_next`) and random picks; after each round
:func:`explorer.curation.active.propagate` predicts every other image. Printed (medians over seeds):
the accuracy on every image not labelled, the estimated accuracy the tool shows, and the
share and accuracy of the predictions it calls sure. Asserts nothing; prints the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.curation import active  # noqa: E402

GOALS = {50: 0.77, 200: 0.84}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def built_vectors(images: Path, work: Path, name: str, features: str = "auto",
                  model: str | None = None):
    """(vectors, true class per row, csv path) of a build of ``images`` kept in ``work``
    (with ``model``'s vectors when given, else the default backbone's)."""
    from explorer import table
    from explorer.curation.search import load_features

    csv = work / f"{name}.csv"
    if not csv.is_file():
        from explorer.stages.pipeline import build

        t = time.perf_counter()
        build(str(images), app=str(work / name), duplicates=None, features=features,
              progress=False, model=model)
        print(f"built {csv} in {time.perf_counter() - t:.0f} s ({load()})")
    df = table.read_table(csv)
    truth = np.array([Path(p).parent.name for p in df["path"].astype(str)])
    return np.asarray(load_features(csv), np.float32), truth, csv


def jitter(X: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """``X`` with the last bit of a random ``share`` of its float16 values flipped (one unit
    in the last place: a change no one would notice, as between two runtimes' embeddings), to
    see how far the loop's medians move for nothing."""
    v = np.ascontiguousarray(X, np.float16).view(np.uint16).copy()
    flip = np.random.default_rng(seed).random(v.shape) < share
    v[flip] ^= np.uint16(1)
    return v.view(np.float16).astype(np.float32)


def simulate(X, truth, *, strategy: str, seed: int, step: int, max_labels: int, graph=None,
             log=False):
    """One person, one seed: a list of dicts per round."""
    classes = sorted(set(truth))
    y = np.array([classes.index(t) for t in truth], np.int32)
    codes = np.full(len(y), -1, np.int32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    out = []
    prop = None
    space = None if graph is None else active.smooth_rows(X, graph)  # k-means and propagate
    while (codes >= 0).sum() < max_labels:
        if strategy == "random":
            rows = order[(codes >= 0).sum():(codes >= 0).sum() + step]
        else:
            rows, _ = active.pick_next(X, codes, step, probs=None if prop is None else prop.probs,
                                       space=space, random_state=seed)
        codes[rows] = y[rows]
        prop = active.propagate(X, codes, len(classes), graph=graph, smoothed=space,
                                random_state=seed)
        un = codes < 0
        right = prop.predicted[un] == y[un]
        sure = prop.sure[un]
        out.append({
            "labels": int((codes >= 0).sum()),
            "accuracy": float(right.mean()) if prop.estimated_accuracy is not None else float("nan"),
            "estimate": prop.estimated_accuracy if prop.estimated_accuracy is not None else float("nan"),
            "cv": prop.cv_accuracy if prop.cv_accuracy is not None else float("nan"),
            "sure_share": float(sure.mean()),
            "sure_accuracy": float(right[sure].mean()) if sure.any() else float("nan"),
        })
        if log:
            print(strategy, seed, {k: round(v, 3) for k, v in out[-1].items()}, flush=True)
    return out


def med(runs, i, key):
    vals = [r[i][key] for r in runs if i < len(r)]
    return statistics.median(vals) if vals else float("nan")


def curve(X, truth, *, seeds: int, step: int, max_labels: int, title: str,
          first_seed: int = 0) -> None:
    print(f"\n== {title}: {len(truth)} images, {len(set(truth))} classes, vectors {X.shape[1]}-d;"
          f" rounds of {step}, median of {seeds} seeds from {first_seed} ({load()})")
    t = time.perf_counter()
    Xp = active.features(X)
    graph = active.neighbours(Xp)
    runs = {s: [simulate(Xp, truth, strategy=s, seed=seed, step=step, max_labels=max_labels,
                         graph=graph)
                for seed in range(first_seed, first_seed + seeds)] for s in ("tool", "random")}
    print(f"simulated in {time.perf_counter() - t:.0f} s ({load()})")
    print("| labels | random picks | tool's picks | estimated (tool) | |est - true| "
          "| sure share | sure accuracy |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    tool, rnd = runs["tool"], runs["random"]
    for i in range(len(tool[0])):
        n = tool[0][i]["labels"]
        errs = [abs(r[i]["estimate"] - r[i]["accuracy"]) for r in tool]
        goal = f" (goal {GOALS[n]})" if n in GOALS else ""
        print(f"| {n} | {med(rnd, i, 'accuracy'):.3f} | {med(tool, i, 'accuracy'):.3f}{goal} "
              f"| {med(tool, i, 'estimate'):.3f} | {statistics.median(errs):.3f} "
              f"(max {max(errs):.3f}) | {med(tool, i, 'sure_share'):.2f} "
              f"| {med(tool, i, 'sure_accuracy'):.3f} |")
    goals(tool)


def goals(tool) -> None:
    """Issue 19's goals against the tool's curve (medians over seeds)."""
    at = {r["labels"]: i for i, r in enumerate(tool[0])}
    for n, goal in GOALS.items():
        if n in at:
            acc = med(tool, at[n], "accuracy")
            print(f"goal: {n} labels accuracy >= {goal}: {acc:.3f} {'met' if acc >= goal else 'MISSED'}")
    if 200 in at:
        share, right = med(tool, at[200], "sure_share"), med(tool, at[200], "sure_accuracy")
        print(f"goal: sure at 200 labels >= 0.97 right: {right:.3f} "
              f"{'met' if right >= 0.97 else 'MISSED'}; covering >= 50%: {share:.2f} "
              f"{'met' if share >= 0.5 else 'MISSED'}")
    errs = [statistics.median(abs(r[i]["estimate"] - r[i]["accuracy"]) for r in tool)
            for n, i in at.items() if n >= 50]
    if errs:
        print(f"goal: |estimate - true| <= 0.05 from 50 labels on (median over seeds): worst "
              f"{max(errs):.3f} {'met' if max(errs) <= 0.05 else 'MISSED'}")


def shapes(folder: Path, per_class: int = 60, size: int = 96, seed: int = 0) -> Path:
    """Non-photographs: 8 classes of drawn glyphs and shapes, random size, place, colours."""
    from PIL import Image, ImageDraw

    if folder.is_dir() and any(folder.iterdir()):
        return folder
    rng = np.random.default_rng(seed)

    def poly(d, cx, cy, r, k, rot, fill, star=False):
        pts = []
        for j in range(k * (2 if star else 1)):
            rr = r if not star or j % 2 == 0 else r * 0.45
            a = rot + j * np.pi * 2 / (k * (2 if star else 1))
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        d.polygon(pts, fill=fill)

    kinds = ["circle", "square", "triangle", "star", "cross", "ring", "bars", "letter_x"]
    for kind in kinds:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = tuple(int(v) for v in rng.integers(0, 256, 3))
            fg = tuple(int(v) for v in rng.integers(0, 256, 3))
            im = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(im)
            r = rng.uniform(14, 40)
            cx, cy = rng.uniform(r, size - r, 2)
            rot = rng.uniform(0, 2 * np.pi)
            w = max(2, int(r / 4))
            if kind == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif kind == "square":
                poly(d, cx, cy, r, 4, rot, fg)
            elif kind == "triangle":
                poly(d, cx, cy, r, 3, rot, fg)
            elif kind == "star":
                poly(d, cx, cy, r, 5, rot, fg, star=True)
            elif kind == "cross":
                d.line([cx - r, cy, cx + r, cy], fill=fg, width=w)
                d.line([cx, cy - r, cx, cy + r], fill=fg, width=w)
            elif kind == "ring":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
            elif kind == "bars":
                for j in range(-2, 3):
                    x = cx + j * r / 2.5
                    d.line([x, cy - r, x, cy + r], fill=fg, width=max(2, w // 2))
            else:
                d.line([cx - r, cy - r, cx + r, cy + r], fill=fg, width=w)
                d.line([cx - r, cy + r, cx + r, cy - r], fill=fg, width=w)
            im.save(folder / kind / f"{kind}{i:03d}.png")
    return folder


def scale(n: int, dim: int, seed: int = 0) -> None:
    """next/propagate timings on ``n`` synthetic float16 vectors with 10 classes."""
    print(f"\n== scale: {n:,} x {dim} float16 synthetic vectors, 10 classes ({load()})")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    y = rng.integers(0, 10, n)
    V = np.empty((n, dim), np.float16)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        V[a:b] = centres[y[a:b]] + rng.normal(scale=3.0, size=(b - a, dim)).astype(np.float32)
    t = time.perf_counter()
    X = active.features(V)
    print(f"features (L2 + PCA-{X.shape[1]}): {time.perf_counter() - t:.1f} s ({load()})")
    codes = np.full(n, -1, np.int32)
    t = time.perf_counter()
    rows, _ = active.pick_next(X, codes, 20)
    print(f"pick_next with no labels (coverage): {time.perf_counter() - t:.1f} s ({load()})")
    lab = rng.choice(n, 200, replace=False)
    codes[lab] = y[lab]
    graph = None
    if n <= active.GRAPH_MAX:  # the neighbour graph, the smoothing and the second opinion
        t = time.perf_counter()
        graph = active.neighbours(X)
        print(f"neighbour graph ({active.NEIGHBOURS} per row): {time.perf_counter() - t:.1f} s "
              f"({load()})")
        t = time.perf_counter()
        active.propagate(X, codes, 10, graph=graph, second_opinion=False)
        print(f"propagate with 200 labels, smoothed, no second opinion: "
              f"{time.perf_counter() - t:.1f} s ({load()})")
    t = time.perf_counter()
    prop = active.propagate(X, codes, 10, graph=graph)
    tp = time.perf_counter() - t
    acc = float((prop.predicted == y).mean())
    print(f"propagate with 200 labels{', smoothed, second opinion' if graph is not None else ''}: "
          f"{tp:.1f} s; accuracy {acc:.3f}, estimated "
          f"{prop.estimated_accuracy:.3f}, sure {prop.sure.mean():.2f} ({load()})")
    t = time.perf_counter()
    active.pick_next(X, codes, 20, probs=prop.probs)
    print(f"pick_next with 200 labels (given the propagation): {time.perf_counter() - t:.1f} s "
          f"({load()})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "clothing-small"))
    p.add_argument("--work", default="/tmp/labelling-bench",
                   help="keeps the builds between runs (outside the repository)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (the method was tuned on 5-9)")
    p.add_argument("--round", type=int, default=10)
    p.add_argument("--max-labels", type=int, default=200)
    p.add_argument("--shapes", action="store_true", help="also the non-photographs")
    p.add_argument("--no-photos", action="store_true")
    p.add_argument("--scale", type=int, default=0, metavar="N",
                   help="also time next/propagate on N synthetic vectors")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--jitter", type=float, default=0.0, metavar="SHARE",
                   help="flip the last bit of this share of the stored float16 values first "
                        "(e.g. 0.01): how much the medians move for a change no one would notice")
    p.add_argument("--model", default=None,
                   help="the photos' backbone (explorer build --model), e.g. "
                        "tf_efficientnet_lite2; default lite0")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not a.no_photos:
        X, truth, _ = built_vectors(Path(a.data), work, "clothing", model=a.model)
        title = f"clothing-small ({a.model or 'lite0'})"
        if a.jitter:
            X = jitter(X, a.jitter)
            title += f", last bit of {a.jitter:.1%} of the values flipped"
        curve(X, truth, seeds=a.seeds, step=a.round, max_labels=a.max_labels,
              title=title, first_seed=a.first_seed)
    if a.shapes:
        folder = shapes(work / "shapes-images")
        X, truth, csv = built_vectors(folder, work, "shapes")
        import json

        run = json.loads(csv.with_name("shapes.run.json").read_text())
        feat = run.get("features") or (run.get("parameters") or {}).get("features")
        if isinstance(feat, dict):
            feat = feat.get("name")
        curve(X, truth, seeds=a.seeds, step=a.round, max_labels=min(a.max_labels, 200),
              title=f"shapes (non-photographs; features auto chose {feat!r})",
              first_seed=a.first_seed)
    if a.scale:
        scale(a.scale, a.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
