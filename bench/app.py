"""Benchmark the explorer app in headless Chromium with a large generated CSV.

Prints medians of a few runs of
  * drawn: navigation start -> plot drawn (all points rendered: every dot drawn, or, above
    the image threshold (explorer.app.density), the server's map image holding every point)
  * lasso: mouse release of a lasso -> table showing the selection
  * zoom (image mode): wheel step -> the re-rendered image for the new range shown
  Goals on a 2-core machine with canvas: 1M drawn < 5 s, lasso < 1.5 s; 100k drawn < 1.5 s,
  lasso < 0.5 s.
  * server: Python time to build a session's document and to handle one selection (dots:
    the index list the browser sends; image: the lasso polygon the browser sends)
  * treemap (after the browser runs; --no-treemap skips it): the hierarchy built in the
    build and loaded from NAME.hierarchy.npz, the first level of the first and the next
    session, each level, a tap and a lasso's outline (bench/treemap.py has the details)
  * browser: one repaint of the plot. Without a GPU, Chromium emulates WebGL in software
    (SwiftShader) and a 100k-point repaint takes seconds; the page then draws with canvas
    instead (app_files/static/js/renderer.js). --renderer webgl measures forced WebGL.

    .venv/bin/python bench/app.py [--points 100000] [--runs 3] [--renderer auto|webgl|canvas]
                                  [--size 1600x1000]

The page is measured in a window of ``--size`` (the map stretches into the window).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
// the count the page shows ("N selected row(s)" or "first 2,000 of N selected rows")
const info = Bokeh.documents[0].get_model_by_name("table_info").text.replace(/,/g, "");
const m = info.match(/of (\\d+)\\s+selected/) || info.match(/(\\d+) selected row/);
return rows > 0 && m ? [performance.now(), parseInt(m[1])] : null;
"""

IMAGE_JS = """
const m = Bokeh.documents[0].get_model_by_name("map_image_source");
if (!m || !m.data.n.length) return null;
return [m.data.x[0], m.data.dw[0], m.data.n[0], m.data.total[0]];
"""

MODE_JS = """
const m = Bokeh.documents[0].get_model_by_name("map_image");
return m && m.visible ? "image" : "dots";
"""

#: the lasso drawn in the browser (data coordinates; closed)
LASSO = [(-22, -22), (0, -22), (0, 0), (-22, 0)]

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
        view = doc.explorer_view
        if view.image_mode:  # what the browser sends: the polygon
            geom = doc.select_one({"name": "lasso_geometry"})
            xs, ys = [p[0] for p in LASSO], [p[1] for p in LASSO]
            t = time.perf_counter()
            geom.data = {"x": xs, "y": ys, "kind": ["poly"] * 4, "mode": ["replace"] * 4, "seq": [1] * 4}
            sels.append(time.perf_counter() - t)
        else:
            src = doc.select_one({"name": "points"})
            idx = list(range(0, len(src.data["x"]), 8))
            t = time.perf_counter()
            src.selected.indices = idx
            sels.append(time.perf_counter() - t)
    return statistics.median(builds), statistics.median(sels)


def zoom_once(drv) -> float:
    """One wheel step over the plot's centre; seconds until the image for the new range is shown."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    before = drv.execute_script(IMAGE_JS)
    r = B.plot_canvas_rect(drv)
    t = time.perf_counter()
    ActionChains(drv).scroll_from_origin(
        ScrollOrigin.from_viewport(int(r["left"] + r["width"] / 2), int(r["top"] + r["height"] / 2)), 0, -200
    ).perform()
    B.wait_for(drv, "const r = (() => {" + IMAGE_JS + "})(); return r && r[1] < arguments[0] * 0.99;",
               before[1], timeout=60, poll=0.01)  # fmt: skip
    return time.perf_counter() - t


def treemap_line(app_dir: Path, csv: Path) -> None:
    """The treemap's figures in one line (bench/treemap.py prints each step)."""
    import treemap as treemap_bench

    b = treemap_bench.store_hierarchy(csv)
    m = treemap_bench.measure(app_dir, csv, echo=lambda s: None)
    print(f"treemap: hierarchy {b['build']:.1f} s in the build, {m['load']:.2f} s to load from the sidecar; "
          f"first level {m['first']:.3f} s (first session), {m['next']:.3f} s (next); each level median "
          f"{m['level_median']:.3f} s, max {m['level_max']:.3f} s; a whole tap median {m['tap_median']:.2f} s; "
          f"lasso outline {m['lasso']:.3f} s (goal: each level < 1 s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--renderer", choices=["auto", "webgl", "canvas"], default="auto",
                    help="auto: WebGL with a GPU, canvas where WebGL is software-emulated")
    ap.add_argument("--size", default="1600x1000", help="the page's viewport, WIDTHxHEIGHT (CSS pixels)")
    ap.add_argument("--no-treemap", dest="treemap", action="store_false",
                    help="skip the treemap figures (they build the hierarchy: minutes at 1M)")
    args = ap.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if B.find_chromium() is None:
        print("chromium/chromedriver not installed: apt-get install -y chromium chromium-driver")
        return 1
    with tempfile.TemporaryDirectory(prefix="explorer-bench-") as tmp:
        t = time.perf_counter()
        app_dir, csv = make_big_csv(tmp, args.points)
        print(f"generated {args.points:,} points in {time.perf_counter() - t:.1f} s ({csv.stat().st_size / 1e6:.1f} MB CSV)")
        build, sel = server_side(app_dir, csv, args.runs)
        print(f"server: document build {build:.2f} s, one selection {sel:.2f} s (median of {args.runs})", flush=True)
        loads, lassos, counts, paints, zooms = [], [], [], [], []
        with B.serve(app_dir, csv, timeout=300) as url, B.chromium(width=width, height=height) as drv:
            drv.set_script_timeout(300)
            B.set_viewport(drv, width, height)
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
                B.lasso(drv, LASSO)
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
                if drv.execute_script(MODE_JS) == "image":
                    zooms.append(zoom_once(drv))
                    print(f"  zoom: wheel -> new image {zooms[-1]:.2f} s", flush=True)
            used = drv.execute_script("return window.explorerRenderer || null")
            mode = drv.execute_script(MODE_JS)
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
        if zooms:
            print(f"zoom: wheel step -> re-rendered image shown: median {statistics.median(zooms):.2f} s"
                  f"  runs {', '.join(f'{v:.2f}' for v in zooms)}")
        from explorer.app.density import image_threshold

        print(f"map: {mode} (image above {image_threshold():,} points), page {width} x {height}")
        print(f"renderer: {used}")
        if args.treemap:
            treemap_line(app_dir, csv)
        print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
