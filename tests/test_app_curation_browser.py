"""Curation in real headless Chromium against ``bokeh serve``: nothing acknowledged is lost
when the server is killed with SIGKILL; two tabs see each other's labels without reload;
the drill-down map in the page.

Needs Debian's chromium + chromium-driver; skipped with a reason when they are absent.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import make_app  # noqa: E402

import _browser as B  # noqa: E402
from explorer.table import sidecar  # noqa: E402

pytestmark = pytest.mark.browser

if B.find_chromium() is None:
    pytest.skip(
        "chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

LABEL_TAB = 1
#: images per cluster: two clusters (14) stay under ``reduce.MIN_UMAP_POINTS`` (16), so the
#: re-cluster maps them with PCA and its worker process pays no UMAP compile (20 CPU s); the
#: served worker's UMAP re-cluster is test_app_hooks' warm-up
PER_GROUP = 7
ROW, ALL = 2 * PER_GROUP, 4 * PER_GROUP + 3


def open_page(drv, url):
    drv.get(url)
    B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)


def lasso_and_label(drv, corners, n, label):
    """Lasso ``corners`` (data coordinates), wait for ``n`` selected, label them in the Label tab."""
    B.lasso(drv, corners)
    B.wait_model(drv, "table_source", f"m.data['_file'].length == {n}")
    B.set_model(drv, "tabs", "active", LABEL_TAB)
    B.set_model(drv, "label_input", "value", label)
    B.click_button(drv, "apply_label")
    # the page says "saved" only after the journal append returned on the server
    B.wait_model(drv, "status", f"m.text.includes('saved: label') && m.text.includes({json.dumps(label)})")


def legend_has(drv, text):
    return B.wait_model(drv, "legend", f"m.text.includes({json.dumps(text)})")


def journal_labels(csv):
    from explorer.curation.journal import journal_for

    return journal_for(csv).labels()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("curbrowser"), per_group=PER_GROUP, hostile=False)


@pytest.fixture(scope="module")
def served(data):
    """One ``bokeh serve`` and one Chromium for the tests that do not kill their server."""
    app_dir, csv = data
    with B.serve(app_dir, csv) as url, B.chromium() as drv:
        yield url, drv


def test_sigkill_loses_no_acknowledged_label(data):
    app_dir, csv = data
    proc, url = B.launch(app_dir, csv)
    try:
        with B.chromium() as drv:
            open_page(drv, url)
            # clusters 0 and 1, then clusters 2 and 3
            lasso_and_label(drv, [(-3, -3), (13, -3), (13, 3), (-3, 3)], ROW, "bottom row")
            lasso_and_label(drv, [(-3, 7), (13, 7), (13, 13), (-3, 13)], ROW, "top row")
            proc.send_signal(signal.SIGKILL)  # right after the last acknowledgement
            proc.wait(timeout=10)
    finally:
        B.stop(proc)
    on_disk = journal_labels(csv)
    assert sum(v == "bottom row" for v in on_disk.values()) == ROW
    assert sum(v == "top row" for v in on_disk.values()) == ROW
    proc, url = B.launch(app_dir, csv)
    try:
        with B.chromium() as drv:
            open_page(drv, url)
            B.set_model(drv, "color_by", "value", "label")
            assert legend_has(drv, "bottom row") and legend_has(drv, "top row")
            counts = B.model_value(drv, "labels", "m.options.map(o => o[1])")
            assert any(c.startswith("bottom row") and f"({ROW})" in c for c in counts)
            assert any(c.startswith("top row") and f"({ROW})" in c for c in counts)
    finally:
        B.stop(proc)


def test_two_tabs_see_each_others_labels_without_reload(data, served):
    _, csv = data
    url, drv = served
    open_page(drv, url)
    tab_a = drv.current_window_handle
    drv.switch_to.new_window("window")
    tab_b = drv.current_window_handle
    open_page(drv, url)
    B.set_model(drv, "color_by", "value", "label")
    drv.execute_script("window.__loaded_at = performance.timeOrigin;")
    drv.switch_to.window(tab_a)
    lasso_and_label(drv, [(-3, 7), (3, 7), (3, 13), (-3, 13)], PER_GROUP, "seen in B")
    drv.switch_to.window(tab_b)
    assert legend_has(drv, "seen in B")
    assert drv.execute_script("return window.__loaded_at === performance.timeOrigin")  # no reload
    # and back: B's change reaches A, A's label is still there
    lasso_and_label(drv, [(7, 7), (13, 7), (13, 13), (7, 13)], PER_GROUP, "seen in A")
    drv.close()  # tab B; the next test has the browser's first tab
    drv.switch_to.window(tab_a)
    B.set_model(drv, "color_by", "value", "label")
    assert legend_has(drv, "seen in A") and legend_has(drv, "seen in B")
    on_disk = journal_labels(csv)
    assert sum(v == "seen in A" for v in on_disk.values()) == PER_GROUP
    assert sum(v == "seen in B" for v in on_disk.values()) == PER_GROUP


def test_recluster_swaps_the_map_and_back_restores_it(served):
    url, drv = served
    open_page(drv, url)
    B.lasso(drv, [(-3, 7), (13, 7), (13, 13), (-3, 13)])
    B.wait_model(drv, "table_source", f"m.data['_file'].length == {ROW}")
    B.set_model(drv, "tabs", "active", LABEL_TAB)
    B.click_button(drv, "recluster")
    B.wait_model(drv, "points", f"m.data['x'].length == {ROW}", timeout=120)
    assert B.wait_model(drv, "breadcrumbs", "m.text.includes('sel')")
    B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
    B.click_button(drv, "back")
    B.wait_model(drv, "points", f"m.data['x'].length == {ALL}")
    assert B.model_value(drv, "points", "m.selected.indices.length") == ROW
