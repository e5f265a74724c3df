"""How long the app's Label tab holds the Bokeh event loop, on a large generated CSV.

While the event loop is held, no session of the server does anything (no pan, no click, no
other person's label). The Label tab's actions are a plan (the labels now), the model (in the
server's thread pool when served) and a show; before, all three ran on the loop. This builds a
real Bokeh document in-process over ``--points`` rows (30 blobs, ``--dim``-dimensional float16
features), gives ``--labels`` labels (the rows' blob, as a person would), and prints for each
action the time of each part, median of ``--runs`` runs (the first "Label next" makes the
neighbour graph and the smoothed rows, once per process, and is shown apart):

    .venv/bin/python bench/app_labelling.py [--points 200000] [--labels 200] [--runs 3]

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


def parts(plan, compute, show, runs):
    """Medians of (plan, compute, show) over ``runs`` runs."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = plan()
        t1 = time.perf_counter()
        r = compute(p)
        t2 = time.perf_counter()
        show(r)
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return [statistics.median(v) for v in zip(*times)]


def line(name, med):
    plan, compute, show = med
    print(f"{name}: on the event loop {plan + show:.3f} s (plan {plan:.3f} + show {show:.3f}); "
          f"in the pool {compute:.3f} s (on the loop before: {plan + compute + show:.3f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--labels", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    from bokeh.command.util import build_single_handler_application

    with tempfile.TemporaryDirectory(prefix="explorer-bench-lab-") as tmp:
        app_dir, csv = make_big_csv(tmp, args.points)
        rng = np.random.default_rng(0)
        cl = blob_features(csv, args.dim, rng)
        app = build_single_handler_application(str(app_dir), argv=[str(csv)])
        print(f"{args.points:,} points, {args.dim}-d float16 features, {args.labels} labels; "
              f"{os.cpu_count()} cores")
        doc = app.create_document()
        flow = doc.explorer_view.labelling.flow
        st = flow.state
        keys = st.keys
        line("first Label next (makes the neighbour graph and the smoothed rows)",
             parts(lambda: flow.labels(), flow.next_compute, flow.show_batch, 1))
        some = rng.choice(args.points, args.labels, replace=False)
        st.assign_labels(lambda: {keys[i]: f"blob {cl[i]}" for i in some}, "labels")
        line("Label next", parts(lambda: flow.labels(), flow.next_compute, flow.show_batch, args.runs))
        line("Propagate", parts(flow.propagate_plan, flow.propagate_compute, flow.show_propagation,
                                args.runs))
        t = time.perf_counter()
        flow.accept_shown()
        print(f"Accept all sure ({flow.info['sure']:,} predictions): on the event loop "
              f"{time.perf_counter() - t:.3f} s, then a Propagate")
        print(f"machine: load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
