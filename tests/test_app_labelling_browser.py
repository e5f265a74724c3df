"""Labelling a proposed batch with the keyboard, in real headless Chromium against
``bokeh serve``. Needs Debian's chromium + chromium-driver; skipped when they are absent."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import make_app, blank_labels  # noqa: E402

import _browser as B  # noqa: E402
from explorer.curation.journal import journal_for  # noqa: E402

pytestmark = pytest.mark.browser

if B.find_chromium() is None:
    pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

LABEL_TAB = 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    app_dir, csv = make_app(tmp_path_factory.mktemp("labbrowser"), hostile=False)
    blank_labels(csv)
    return app_dir, csv


def wait_labels(csv, n, timeout=20.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        labels = {k: v for k, v in journal_for(csv).labels().items() if v} \
            if journal_for(csv).exists() else {}
        if len(labels) >= n:
            return labels
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} labels in the journal after {timeout} s")


def test_label_a_proposed_batch_with_keys(data):
    from selenium.webdriver.common.action_chains import ActionChains

    app_dir, csv = data
    with B.serve(app_dir, csv) as url:
        with B.chromium() as drv:
            drv.get(url)
            B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
            B.set_model(drv, "tabs", "active", LABEL_TAB)
            B.click_button(drv, "label_next")
            B.wait_for(drv, "const m = Bokeh.documents[0].get_model_by_name('label_batch');"
                       "return m && m.text.includes('<figure');", timeout=60)
            # the first image gets a typed label; that label gets button 1
            B.set_model(drv, "label_input", "value", "mine")
            B.click_button(drv, "apply_label")
            wait_labels(csv, 1)
            B.wait_for(drv, "const m = Bokeh.documents[0].get_model_by_name('label_key_1');"
                       "return m && m.visible && m.label.includes('mine');")
            # then keys: each "1" labels the framed image and moves on
            for n in (2, 3, 4):
                ActionChains(drv).send_keys("1").perform()
                wait_labels(csv, n)
            # a key without a button changes nothing
            ActionChains(drv).send_keys("8").perform()
            time.sleep(1.0)
    labels = {k: v for k, v in journal_for(csv).labels().items() if v}
    assert len(labels) == 4 and set(labels.values()) == {"mine"}
