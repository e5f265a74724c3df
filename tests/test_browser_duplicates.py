"""The Duplicates tab in real headless Chromium against ``bokeh serve``: a keep rule for
every group, an override for one, the others stay marked, undo, and the export leaves the
marked images out.

Needs Debian's chromium + chromium-driver; skipped with a reason when they are absent.
"""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import make_app  # noqa: E402

import _browser as B  # noqa: E402
from explorer.table import read_table, write_table  # noqa: E402

pytestmark = pytest.mark.browser

if B.find_chromium() is None:
    pytest.skip(
        "chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

#: row -> group, and the largest member of each group (what the rule "largest" keeps)
GROUPS = {2: 0, 3: 0, 4: 0, 10: 1, 11: 1, 20: 2, 21: 2}
LARGEST = {2: (900, 700), 10: (800, 600), 21: (700, 500)}

CARDS_JS = """
const m = Bokeh.documents[0].get_model_by_name('dup_groups');
const v = m && Bokeh.index.find_one(m);
if (!v || !m.visible) return null;
const r = v.el.shadowRoot || v.el;
return [...r.querySelectorAll('.ex-dup-card')].map(e => [e.dataset.row, e.dataset.state]);
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    app_dir, csv = make_app(tmp_path_factory.mktemp("dupbrowser"), hostile=False,
                            features=False)
    df = read_table(csv, strict=False)
    group = np.full(len(df), -1)
    for r, g in GROUPS.items():
        group[r] = g
    df["duplicate_group"] = group
    for r, (w, h) in LARGEST.items():
        df.loc[r, "width"], df.loc[r, "height"] = w, h
    write_table(df, csv)
    return app_dir, csv, df["path"].tolist()


def open_tab(drv, title):
    B.set_model(drv, "tabs", "active", drv.execute_script(
        "return Bokeh.documents[0].get_model_by_name('tabs').tabs.map(t => t.title)"
        ".indexOf(arguments[0])", title))


def wait_cards(drv, kept, timeout=15.0):
    """Wait until the page shows every group member, ``kept`` kept and the others marked."""
    want = {str(r): ("kept" if r in kept else "marked") for r in GROUPS}
    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        got = drv.execute_script(CARDS_JS)
        if got is not None and dict(got) == want and len(got) == len(want):
            return
        time.sleep(0.05)
    raise AssertionError(f"cards {got} != {want}")


def marked_on_disk(csv, paths):
    from explorer.curation.journal import journal_for

    on_disk = journal_for(csv).labels()
    return sorted(r for r, p in enumerate(paths) if on_disk.get(p) == "discard")


def wait_files(folder: Path, names, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = {p.name for p in folder.iterdir()}
        if set(names) <= have and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"downloads {names} not in {sorted(p.name for p in folder.iterdir())}")


def test_rule_override_undo_and_export_in_the_browser(project, tmp_path):
    app_dir, csv, paths = project
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with B.serve(app_dir, csv) as url, B.chromium(download_dir=downloads) as drv:
        drv.get(url)
        B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
        open_tab(drv, "Duplicates")
        B.wait_for(drv, f"const c = (() => {{{CARDS_JS}}})(); return c && c.length == {len(GROUPS)};")
        # the rule for every group at once: one click
        B.set_model(drv, "dup_rule", "value", "largest")
        B.click_button(drv, "dup_apply")
        wait_cards(drv, kept={2, 10, 21})
        assert marked_on_disk(csv, paths) == [3, 4, 11, 20]

        # override group 0: keep row 4 instead; the other groups stay as the rule left them
        B.set_model(drv, "dup_group", "value", "0")
        B.wait_for(drv, "return Bokeh.documents[0].get_model_by_name('dup_keep').options"
                   ".includes(arguments[0])", paths[4])
        B.set_model(drv, "dup_keep", "value", paths[4])
        B.click_button(drv, "dup_override")
        wait_cards(drv, kept={4, 10, 21})
        assert marked_on_disk(csv, paths) == [2, 3, 11, 20]

        # undo takes the override back, the rule's marks stay
        B.click_button(drv, "dup_undo")
        wait_cards(drv, kept={2, 10, 21})
        assert marked_on_disk(csv, paths) == [3, 4, 11, 20]

        # export: the label folders (ImageFolder zip) leave the marked images out
        open_tab(drv, "Label")
        B.set_model(drv, "labels_name", "value", "kept")
        B.click_button(drv, "save_labels")
        wait_files(downloads, ["kept.csv", "kept.zip"])
    with zipfile.ZipFile(downloads / "kept.zip") as zf:
        files = {Path(n).name for n in zf.namelist() if n.endswith(".jpg")}
    assert {Path(paths[r]).name for r in (3, 4, 11, 20)}.isdisjoint(files)
    assert {Path(paths[r]).name for r in (2, 10, 21)} <= files
    assert len(files) == len(paths) - 4  # every other image is labelled: all but the marked
