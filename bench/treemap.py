"""Benchmark the Treemap tab at a large number of rows (server side, in-process).

Prints, for a generated app of ``--points`` rows (30 blobs, 64-dim float16 features):
  * hierarchy in the build: what ``explorer build``'s hierarchy stage does (the group
    hierarchy built from the features, then written to ``NAME.hierarchy.npz``)
  * hierarchy load: reading and checking that file (fingerprint of the features, row count,
    parameters), and the whole project load the server does at start (preload thread)
  * first level, first session: opening the tab in the first session (tiles of the root)
  * per level: tapping the largest tile down to a leaf: each level drawn by the treemap
    (median, max), and the whole tap (the selection on the map, table and grid too)
  * lasso: the treemap's part of a selection of a quarter of the rows (tiles outlined)
  * next session: opening the tab in a second session
Goal (issue 18): each level drawn in < 1 s at 1M rows on 2 cores, the first level of a
session from a per-process cache.

    .venv/bin/python bench/treemap.py [--points 1000000]
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

from _appdata import group_features, make_big_csv  # noqa: E402


def store_hierarchy(csv: Path) -> dict:
    """Features for ``csv`` (as a build writes them) and the build's hierarchy stage on them;
    seconds taken."""
    from explorer.stages import hierarchy as H
    from explorer.table import read_table, sidecar

    df = read_table(csv)
    feats = group_features(df["cluster"].to_numpy(), dim=64)
    np.save(sidecar(csv, "features.npy"), feats)
    t = time.perf_counter()
    tree = H.build_hierarchy(feats, **H.overview_params(len(feats)))
    built = time.perf_counter() - t
    t = time.perf_counter()
    H.save_tree(sidecar(csv, "hierarchy.npz"), tree, H.fingerprint(feats))
    saved = time.perf_counter() - t
    return {"build": built, "save": saved, "groups": len(tree), "depth": tree.depth,
            "mb": sidecar(csv, "hierarchy.npz").stat().st_size / 1e6}


def measure(app_dir: Path, csv: Path, echo=print) -> dict:
    """The treemap figures of an app whose CSV has a stored hierarchy (see the docstring)."""
    from bokeh.command.util import build_single_handler_application

    from explorer.stages import hierarchy as H
    from explorer.app.project import forget_projects, load_project
    from explorer.table import sidecar

    out: dict = {}
    feats = np.load(sidecar(csv, "features.npy"), mmap_mode="r")
    n = len(feats)
    t = time.perf_counter()
    H.load_tree(sidecar(csv, "hierarchy.npz"), n, fingerprint=H.fingerprint(feats),
                params=H.overview_params(n))
    out["load"] = time.perf_counter() - t
    forget_projects()
    t = time.perf_counter()
    project = load_project(csv, app_dir, app_dir.name)  # what the server's preload does
    out["project"] = time.perf_counter() - t
    if project.tree_ready is None:
        raise SystemExit(f"the stored hierarchy was not used: {project.tree_problem}")
    echo(f"hierarchy load from {sidecar(csv, 'hierarchy.npz').name}: {out['load']:.2f} s "
         f"(project load at server start, with it and the tile-name codes: {out['project']:.1f} s)")
    app = build_single_handler_application(str(app_dir), argv=[str(csv)])
    t = time.perf_counter()
    doc = app.create_document()
    echo(f"session document: {time.perf_counter() - t:.2f} s")
    view = doc.explorer_view
    st = view.state
    panel = view.treemap
    t = time.perf_counter()
    panel.open()
    out["first"] = time.perf_counter() - t
    echo(f"first level, first session: {out['first']:.3f} s ({len(panel.tiles.ids)} tiles)")

    levels, draws, calls = [], [], []
    plain_draw = panel.draw

    def timed_draw() -> None:  # every redraw the state's events cause, timed
        t0 = time.perf_counter()
        plain_draw()
        calls.append(time.perf_counter() - t0)

    panel.draw = timed_draw
    while True:
        data = panel.source.data
        i = int(np.argmax(data["count"]))
        gid = data["id"][i]
        if not st.tree.children(gid):
            break
        calls.clear()
        t = time.perf_counter()
        panel.source.selected.indices = [i]  # tap: select the tile's images + open it
        levels.append(time.perf_counter() - t)
        draws.append(max(calls))  # the first draw of a level in the process is the cold one
        echo(f"  tap {gid}: {levels[-1]:.3f} s in all, level drawn {draws[-1]:.3f} s "
             f"({st.tree.node(gid).count:,} images selected, {len(panel.tiles.ids)} tiles)")
    panel.draw = plain_draw
    t = time.perf_counter()
    panel.go_up(0)
    out["up"] = time.perf_counter() - t
    rows = np.arange(0, st.n_rows, 4)
    st.select(rows)  # the selection itself (map, table) is measured by bench/app.py
    t = time.perf_counter()
    panel.draw()
    out["lasso"] = time.perf_counter() - t
    out["level_median"], out["level_max"] = statistics.median(draws), max(draws)
    out["tap_median"], out["tap_max"] = statistics.median(levels), max(levels)
    out["levels"] = len(draws)
    echo(f"per level drawn: median {out['level_median']:.3f} s, max {out['level_max']:.3f} s over "
         f"{len(draws)} levels; a whole tap (the map, table and grid updated too): median "
         f"{out['tap_median']:.3f} s, max {out['tap_max']:.3f} s; back to All {out['up']:.3f} s")
    echo(f"lasso of {len(rows):,} rows: treemap redraw {out['lasso']:.3f} s "
         f"({int((panel.tiles.selected > 0).sum())} tiles outlined)")
    doc2 = app.create_document()
    t = time.perf_counter()
    doc2.explorer_view.treemap.open()
    out["next"] = time.perf_counter() - t
    echo(f"next session, first level: {out['next']:.3f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        app_dir, csv = make_big_csv(tmp, args.points)
        print(f"generated {args.points:,} rows in {time.perf_counter() - t:.1f} s")
        b = store_hierarchy(csv)
        print(f"hierarchy in the build: {b['build']:.1f} s to build ({b['groups']:,} groups, depth "
              f"{b['depth']}), {b['save']:.2f} s to write ({b['mb']:.0f} MB)")
        measure(app_dir, csv)
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
