"""Make README's screenshot: start the app, lasso a region, save docs/screenshot.png.

    .venv/bin/python src/screenshot.py                       # demo/ with demo.csv
    .venv/bin/python src/screenshot.py APP_DIR CSV [-o OUT]  # any app built by explorer build

The lasso goes around the densest cluster of the map (largest cluster id by count) so
the grid and table below the plot show real images. Needs chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import _browser as B  # noqa: E402
from explorer.table import read_table  # noqa: E402


def lasso_polygon(csv: Path) -> list[tuple[float, float]]:
    """An octagon around the biggest cluster (at least 4% of the map wide)."""
    df = read_table(csv, strict=False)
    df = df[np.isfinite(df["x"]) & np.isfinite(df["y"])]
    clusters = df[df["cluster"] >= 0]["cluster"]
    part = df[df["cluster"] == clusters.value_counts().idxmax()] if len(clusters) else df
    cx, cy = float(part["x"].median()), float(part["y"].median())
    d = np.hypot(part["x"] - cx, part["y"] - cy)
    span = float(max(np.ptp(df["x"]), np.ptp(df["y"]), 1e-6)) if len(df) else 1.0
    r = float(np.quantile(d, 0.9)) * 1.3 if len(d) else 0.0
    r = max(r, 0.04 * span)  # big enough to drag on screen
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 9)[:-1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("app_dir", nargs="?", default=str(REPO / "demo"))
    ap.add_argument("csv", nargs="?", default=None, help="default: APP_DIR/../<name>.csv")
    ap.add_argument("-o", "--out", default=str(REPO / "docs" / "screenshot.png"))
    ap.add_argument("--width", type=int, default=1120)
    ap.add_argument("--height", type=int, default=1150)
    args = ap.parse_args(argv)
    app_dir = Path(args.app_dir).resolve()
    csv = Path(args.csv).resolve() if args.csv else app_dir.parent / f"{app_dir.name}.csv"
    if not (app_dir / "main.py").is_file():
        print(f"not an app folder (no main.py): {app_dir}", file=sys.stderr)
        return 2
    if not csv.is_file():
        print(f"CSV not found: {csv}", file=sys.stderr)
        return 2
    if B.find_chromium() is None:
        print("chromium/chromedriver not installed: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    polygon = lasso_polygon(csv)
    with B.serve(app_dir, csv) as url, B.chromium(width=args.width, height=args.height) as drv:
        drv.get(url)
        B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=120)
        B.lasso(drv, polygon)
        B.wait_for(
            drv,
            "const s = Bokeh.documents[0].get_model_by_name('table_source');"
            "return s && s.data['_file'].length > 0;",
            timeout=60,
        )
        # let the grid's thumbnails load, then move the pointer off the plot
        B.wait_for(
            drv,
            "const m = Bokeh.documents[0].get_model_by_name('grid'); const v = Bokeh.index.find_one(m);"
            "const imgs = v ? [...v.el.shadowRoot.querySelectorAll('img')] : [];"
            "return imgs.length > 0 && imgs.every(i => i.complete);",
            timeout=30,
        )
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        ab = ActionBuilder(drv)
        ab.pointer_action.move_to_location(args.width - 5, 5)
        ab.perform()
        time.sleep(0.5)
        drv.save_screenshot(str(out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
