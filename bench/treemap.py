"""Benchmark the Treemap tab at a large number of rows (server side, in-process).

Prints, for a generated app of ``--points`` rows (30 blobs, 64-dim float16 features):
  * tree: building the group hierarchy (once per process, off the event loop in the app)
  * first level: opening the tab in a session (the tiles of the root drawn)
  * per level: tapping the largest tile down to a leaf: each level drawn by the treemap
    (median, max), and the whole tap (the selection on the map, table and grid too)
  * lasso: the treemap's part of a selection of a quarter of the rows (tiles outlined)
  * next session: opening the tab in a second session (the level layout from the
    per-process cache)
Goal (issue 18): each level drawn in < 1 s at 1M rows on 2 cores.

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    from bokeh.command.util import build_single_handler_application

    from explorer.table import read_table, sidecar

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        app_dir, csv = make_big_csv(tmp, args.points)
        df = read_table(csv)
        np.save(sidecar(csv, "features.npy"), group_features(df["cluster"].to_numpy(), dim=64))
        print(f"generated {args.points:,} rows in {time.perf_counter() - t:.1f} s")
        app = build_single_handler_application(str(app_dir), argv=[str(csv)])

        t = time.perf_counter()
        doc = app.create_document()
        print(f"session document: {time.perf_counter() - t:.2f} s")
        view = doc.explorer_view
        st = view.state
        t = time.perf_counter()
        st.overview_compute()
        print(f"tree (once per process): {time.perf_counter() - t:.1f} s, {len(st.tree):,} groups, depth {st.tree.depth}")
        panel = view.treemap
        t = time.perf_counter()
        panel.open()
        first = time.perf_counter() - t
        print(f"first level: {first:.3f} s ({len(panel.tiles.ids)} tiles)")

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
            print(f"  tap {gid}: {levels[-1]:.3f} s in all, level drawn {draws[-1]:.3f} s "
                  f"({st.tree.node(gid).count:,} images selected, {len(panel.tiles.ids)} tiles)")
        panel.draw = plain_draw
        t = time.perf_counter()
        panel.go_up(0)
        up = time.perf_counter() - t
        rows = np.arange(0, st.n_rows, 4)
        st.select(rows)  # the selection itself (map, table) is measured by bench/app.py
        t = time.perf_counter()
        panel.draw()
        lasso = time.perf_counter() - t
        print(f"per level drawn: median {statistics.median(draws):.3f} s, max {max(draws):.3f} s over "
              f"{len(draws)} levels; a whole tap (the map, table and grid updated too): median "
              f"{statistics.median(levels):.3f} s, max {max(levels):.3f} s; back to All {up:.3f} s")
        print(f"lasso of {len(rows):,} rows: treemap redraw {lasso:.3f} s "
              f"({int((panel.tiles.selected > 0).sum())} tiles outlined)")

        doc2 = app.create_document()
        t = time.perf_counter()
        doc2.explorer_view.treemap.open()
        print(f"next session, first level: {time.perf_counter() - t:.3f} s")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
