"""The layout switch of the Label tab in real headless Chromium against ``bokeh serve``: a
build with a layout made with the person's labels (``NAME.layout-labels.npz``, written here
directly: the UMAP itself is tested in tests/test_app_labelling_map.py) offers the switch on
load, and clicking "with my labels" moves the points in the browser. Needs Debian's chromium
+ chromium-driver; skipped when they are absent."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import make_app  # noqa: E402

import _browser as B  # noqa: E402
from explorer.curation import remap  # noqa: E402
from explorer.table import read_table  # noqa: E402

pytestmark = pytest.mark.browser

if B.find_chromium() is None:
    pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

LABEL_TAB = 1


def test_switch_between_the_original_and_the_labelled_layout(tmp_path):
    app_dir, csv = make_app(tmp_path, hostile=False)
    df = read_table(csv)
    keys = df["path"].tolist()
    n = len(keys)
    xy = np.stack([-df["x"].to_numpy() * 3 - 100, df["y"].to_numpy()], axis=1).astype(np.float32)
    remap.save(csv, keys, remap.Remapped(xy, np.zeros((n, 2), np.float32), np.zeros(n, np.int64), 4, []))
    first_x = float(df["x"].iloc[0])
    with B.serve(app_dir, csv) as url:
        with B.chromium() as drv:
            drv.get(url)
            B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
            B.set_model(drv, "tabs", "active", LABEL_TAB)
            B.wait_for(drv, "const m = Bokeh.documents[0].get_model_by_name('layout_switch');"
                       "return m && m.visible && m.active === 0;")
            xs = "Bokeh.documents[0].get_model_by_name('points').data.x[0]"
            assert abs(drv.execute_script(f"return {xs};") - first_x) < 1e-3
            # a real click on "with my labels"
            drv.execute_script(
                "const m = Bokeh.documents[0].get_model_by_name('layout_switch');"
                "const v = Bokeh.index.find_one(m); const r = v.el.shadowRoot || v.el;"
                "const b = r.querySelectorAll('button')[1]; b.scrollIntoView({block: 'center'});"
                "return b;").click()
            B.wait_for(drv, f"return Math.abs({xs} - ({float(xy[0, 0])})) < 1e-3;")
            # and back
            drv.execute_script(
                "const m = Bokeh.documents[0].get_model_by_name('layout_switch');"
                "const v = Bokeh.index.find_one(m); const r = v.el.shadowRoot || v.el;"
                "return r.querySelectorAll('button')[0];").click()
            B.wait_for(drv, f"return Math.abs({xs} - ({first_x})) < 1e-3;")
