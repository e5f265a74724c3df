"""Server-side time of the app's curation actions on a large generated CSV.

Builds real Bokeh documents in-process (what ``bokeh serve`` runs per session) over
``--points`` rows with random ``--dim``-dimensional embeddings (``NAME.features.npy``,
float16) and prints medians of ``--runs`` runs of each action, from the widget event to
the document being updated (journal fsync included):

  * apply a label to a selection (1/8 of the points), undo it
  * another tab picking the change up (one poll of its periodic callback)
  * tap one image -> its 12 nearest neighbours in the grid
  * 'label similar' suggestions for every unlabelled image
  * re-cluster a selection of --recluster images (UMAP + HDBSCAN; first call compiles numba)
  * first open of the Overview tab (builds the hierarchy)
  * Save labels (CSV of every row) and a new session replaying the journal

    .venv/bin/python bench/app_curation.py [--points 100000] [--dim 256] [--runs 3]

Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _appdata import blob_features, make_big_csv  # noqa: E402

from explorer.curation.journal import Journal, journal_for  # noqa: E402


def click(model):
    from bokeh.events import ButtonClick

    model._trigger_event(ButtonClick(model))


def timed(fn, runs, setup=None):
    out = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def show(name, times, extra=""):
    runs = ", ".join(f"{v:.3f}" for v in times)
    print(f"{name}: median {statistics.median(times):.3f} s  runs {runs}{extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recluster", type=int, default=2000)
    args = ap.parse_args(argv)
    from bokeh.command.util import build_single_handler_application

    with tempfile.TemporaryDirectory(prefix="explorer-bench-cur-") as tmp:
        app_dir, csv = make_big_csv(tmp, args.points)
        rng = np.random.default_rng(0)
        cl = blob_features(csv, args.dim, rng)
        app = build_single_handler_application(str(app_dir), argv=[str(csv)])
        print(f"{args.points:,} points, {args.dim}-d float16 features; {os.cpu_count()} cores")
        a, b = app.create_document(), app.create_document()
        w = lambda d, n: d.select_one({"name": n})  # noqa: E731
        idx = list(range(0, args.points, 8))
        w(a, "points").selected.indices = idx
        names = iter(range(10**6))

        def apply():
            w(a, "label_input").value = f"label {next(names) % 5}"
            click(w(a, "apply_label"))
            assert "saved:" in w(a, "status").text

        show(f"apply label to {len(idx):,} selected (journal fsync + repaint data)", timed(apply, args.runs))
        show("undo", timed(lambda: click(w(a, "undo")), args.runs))
        show("other tab: one poll that finds the changes", timed(lambda: b.explorer_view.poll(), 1))
        show("other tab: one poll with nothing new", timed(lambda: b.explorer_view.poll(), args.runs))
        w(a, "color_by").value = "label"
        show("apply label while coloured by label", timed(apply, args.runs))
        show("tap one image -> 12 neighbours", timed(lambda: setattr(w(a, "points").selected, "indices", [int(rng.integers(args.points))]), args.runs))
        show("label similar (suggestions for unlabelled)", timed(lambda: click(w(a, "propose")), args.runs),
             f"  ({len(a.explorer_view.state.suggestions):,} suggestions)")
        sel = sorted(rng.choice(args.points, args.recluster, replace=False).tolist())

        def recluster():
            w(a, "points").selected.indices = sel
            click(w(a, "recluster"))

        first = timed(recluster, 1, setup=lambda: a.explorer_view.state.drill_up(0))
        show(f"re-cluster {args.recluster:,} images, first call (numba compile)", first)
        show(f"re-cluster {args.recluster:,} images", timed(recluster, args.runs, setup=lambda: a.explorer_view.state.drill_up(0)))
        show("back to the whole map", timed(lambda: click(w(a, "back")), 1))

        def overview():
            a.explorer_view.state.tree = None
            a.explorer_view._overview_open = False
            w(a, "tabs").active = 0
            w(a, "tabs").active = 2

        show("first open of the Overview tab (hierarchy build)", timed(overview, args.runs))
        k = iter(range(10**6))
        w(a, "imagefolder").active = False  # the generated CSV has no original images

        def save():
            w(a, "labels_name").value = f"l{next(k)}"
            click(w(a, "save_labels"))
            assert "saved" in w(a, "status").text, w(a, "status").text

        show("Save labels (CSV of every row)", timed(save, args.runs))
        n_rec = len(list(Journal(journal_for(csv).path).replay()))
        show(f"new session (document build, journal of {n_rec} records replayed)", timed(app.create_document, args.runs))
        print(f"machine: load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
