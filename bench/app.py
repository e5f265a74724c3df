"""Benchmark the explorer app in headless Chromium with a large generated CSV.

Prints medians of a few runs of
  * drawn: navigation start -> plot drawn (all points rendered)
  * lasso: mouse release of a lasso -> table showing the selection
  Goals on a 2-core machine with canvas: 1M drawn < 5 s, lasso < 1.5 s; 100k drawn < 1.5 s,
  lasso < 0.5 s.
  * server: Python time to build a session's document and to handle one selection
  * browser: one repaint of the plot. Without a GPU, Chromium emulates WebGL in software
    (SwiftShader) and a 100k-point repaint takes seconds; the page then draws with canvas
    instead (app_files/static/js/renderer.js). --renderer webgl measures forced WebGL.

    .venv/bin/python bench/app.py [--points 100000] [--runs 3] [--renderer auto|webgl|canvas]

Needs chromium + chromium-driver (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _appdata import make_big_csv  # noqa: E402

import _browser as B  # noqa: E402

DRAWN_AT_JS = "const ok = (() => {" + B.PLOT_DRAWN_JS + "})(); return ok ? performance.now() : null;"

TABLE_AT_JS = """
const src = Bokeh.documents[0].get_model_by_name("table_source");
const table = Bokeh.documents[0].get_model_by_name("table");
if (!src || src.data["_file"].length == 0) return null;
const v = Bokeh.index.find_one(table);
if (!v) return null;
const rows = v.el.shadowRoot ? v.el.shadowRoot.querySelectorAll(".slick-row").length : 0;
const sel = Bokeh.documents[0].get_model_by_name("points").selected.indices.length;
return rows > 0 ? [performance.now(), sel] : null;
"""

REPAINT_JS = """
const pv = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name("plot"));
const t = performance.now();
pv.request_repaint(); pv.paint();
return performance.now() - t;
"""

ARM_JS = """
window.__t_up = null;
window.addEventListener("pointerup", () => { window.__t_up = performance.now(); }, {capture: true, once: true});
"""


def server_side(app_dir: Path, csv: Path, runs: int) -> tuple[float, float]:
    """(document build s, one selection s) measured in-process, medians."""
    from bokeh.command.util import build_single_handler_application

    app = build_single_handler_application(str(app_dir), argv=[str(csv)])
    builds, sels = [], []
    for _ in range(runs):
        t = time.perf_counter()
        doc = app.create_document()
        builds.append(time.perf_counter() - t)
        src = doc.select_one({"name": "points"})
        idx = list(range(0, len(src.data["x"]), 8))
        t = time.perf_counter()
        src.selected.indices = idx
        sels.append(time.perf_counter() - t)
    return statistics.median(builds), statistics.median(sels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--renderer", choices=["auto", "webgl", "canvas"], default="auto",
                    help="auto: WebGL with a GPU, canvas where WebGL is software-emulated")
    args = ap.parse_args(argv)
    if B.find_chromium() is None:
        print("chromium/chromedriver not installed: apt-get install -y chromium chromium-driver")
        return 1
    with tempfile.TemporaryDirectory(prefix="explorer-bench-") as tmp:
        t = time.perf_counter()
        app_dir, csv = make_big_csv(tmp, args.points)
        print(f"generated {args.points:,} points in {time.perf_counter() - t:.1f} s ({csv.stat().st_size / 1e6:.1f} MB CSV)")
        build, sel = server_side(app_dir, csv, args.runs)
        print(f"server: document build {build:.2f} s, one selection of {args.points // 8:,} points {sel:.2f} s (median of {args.runs})", flush=True)
        loads, lassos, counts, paints = [], [], [], []
        with B.serve(app_dir, csv, timeout=300) as url, B.chromium(width=1400, height=1300) as drv:
            drv.set_script_timeout(300)
            if args.renderer != "auto":
                url = f"{url}?renderer={args.renderer}"
            drv.get(url)  # warm up (caches bokeh.js, starts the server's first session)
            B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=120)
            for _ in range(args.runs):
                drv.get("about:blank")
                drv.get(url)
                drawn = B.wait_for(drv, DRAWN_AT_JS, timeout=120, poll=0.02)
                loads.append(drawn / 1000.0)  # performance.now() counts from navigation start
                drv.execute_script(ARM_JS)
                B.lasso(drv, [(-22, -22), (0, -22), (0, 0), (-22, 0)])
                shown, n = B.wait_for(drv, TABLE_AT_JS, timeout=60, poll=0.02)
                up = drv.execute_script("return window.__t_up")
                lassos.append((shown - up) / 1000.0)
                counts.append(n)
                print(f"  run {len(loads)}: drawn {loads[-1]:.2f} s, lasso {lassos[-1]:.2f} s ({n:,} selected)", flush=True)
                time.sleep(0.5)
                try:
                    paints.append(drv.execute_script(REPAINT_JS) / 1000.0)
                except Exception as exc:  # selenium's script timeout on a very slow repaint
                    print(f"  repaint not measured: {type(exc).__name__}", flush=True)
                    paints.append(float("nan"))
            used = drv.execute_script("return window.explorerRenderer || null")
        goal_draw, goal_lasso = (5.0, 1.5) if args.points > 300_000 else (1.5, 0.5)
        print(f"drawn: navigation -> plot drawn: median {statistics.median(loads):.2f} s  runs {', '.join(f'{v:.2f}' for v in loads)}  (goal < {goal_draw} s)")
        print(
            f"lasso: release -> table shows selection: median {statistics.median(lassos):.2f} s  "
            f"runs {', '.join(f'{v:.2f}' for v in lassos)}  (selected {counts[0]:,} points; goal < {goal_lasso} s)"
        )
        print(
            f"repaint: one repaint of the {args.points:,}-point plot: median {statistics.median(paints):.2f} s"
            f"  runs {', '.join(f'{v:.2f}' for v in paints)}"
        )
        print(f"renderer: {used}")
        print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
