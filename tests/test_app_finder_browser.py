"""The Find tab in headless Chromium (Debian's chromium + chromium-driver, else skipped)
against ``bokeh serve``: a person types words into the search box and sees the ranked
results, selected on the map."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import HOSTILE  # noqa: E402
from _finderdata import make_finder_app  # noqa: E402
from _sharedcache import class_vectors_cached  # noqa: E402

import _browser as B  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.skipif(
    B.find_chromium() is None, reason="chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)")]

DEEP_JS = """
function deep(root, sel, out) {
  root.querySelectorAll(sel).forEach(e => out.push(e));
  root.querySelectorAll("*").forEach(e => { if (e.shadowRoot) deep(e.shadowRoot, sel, out); });
  return out;
}
return deep(document, arguments[0], []);
"""


def deep(drv, selector):
    return drv.execute_script(DEEP_JS, selector)


FIRST_JS = DEEP_JS.replace("return deep(document, arguments[0], []);",
                           "const e = deep(document, arguments[0], []); return e.length ? e[0] : null;")
COUNT_JS = DEEP_JS.replace("return deep(document, arguments[0], []);",
                           "return deep(document, arguments[0], []).length == arguments[1];")


def test_typing_words_in_the_search_box_shows_the_ranked_grid_and_selects_it(tmp_path, tmp_path_factory):
    app_dir, csv, _ = make_finder_app(tmp_path)
    # the server reads the class-name vectors from the user cache: the run's folder, where
    # the run's first Find test encoded them (tests/_sharedcache.py)
    class_vectors_cached(tmp_path_factory)
    with B.serve(app_dir, csv) as url, B.chromium() as drv:
        drv.get(url)
        B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
        drv.execute_script("window.__alerts = []; window.alert = m => window.__alerts.push(String(m));")
        tab = next(t for t in deep(drv, ".bk-tab") if t.text.strip() == "Find")
        tab.click()
        B.wait_for(drv, "return Bokeh.documents[0].get_model_by_name('tabs').active == 4")
        B.set_model(drv, "search_top", "value", "10")
        box = B.wait_for(drv, FIRST_JS, "input[placeholder='e.g. a red dress']")
        box.send_keys("a cat\n")
        # the first query loads the text model ("working..."), then the grid shows
        B.wait_for(drv, COUNT_JS, ".ex-results figure", 10, timeout=120)
        names = [e.text for e in deep(drv, ".ex-results .ex-name")]
        assert all(n.startswith("cat_") or n == HOSTILE for n in names[:5]), names
        scores = [e.text for e in deep(drv, ".ex-results .ex-dist")]
        assert scores[0].startswith("#1") and "score" in scores[0]
        sel = B.wait_for(drv, "const m = Bokeh.documents[0].get_model_by_name('points');"
                              "return m.selected.indices.length == 10 ? Array.from(m.selected.indices) : null;")
        assert len(set(sel)) == 10
        # the hostile file name is shown as text, never run as markup
        assert drv.execute_script("return window.__alerts") == []
        assert [e for e in drv.get_log("browser") if e["level"] == "SEVERE"] == []
