"""The Duplicates tab in a real Bokeh Document: rule, override, undo, export leaves the others out."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import click, copy_app, make_app, widget as w, app_document, served_on_ticks  # noqa: E402

from explorer.table import read_table, write_table  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    app_dir, csv = make_app(tmp_path_factory.mktemp("dupdoc"), features=False)
    df = read_table(csv, strict=False)
    group = np.full(len(df), -1)
    group[[2, 3, 4]] = 0  # three crops of the cat (the largest group: shown first)
    group[[10, 11]] = 1  # two of the coffee
    df["duplicate_group"] = group
    df.loc[2, "width"], df.loc[2, "height"] = 900, 700  # the largest of group 0
    write_table(df, csv)
    return app_dir, csv


@pytest.fixture
def doc(built, tmp_path):
    return app_document(*copy_app(*built, tmp_path))


def open_tab(doc):
    tabs = w(doc, "tabs")
    tabs.active = [t.title for t in tabs.tabs].index("Duplicates")


def marks(doc):
    st = doc.explorer_view.state
    lab = np.asarray(st.labels("label"))
    return sorted(st.keys[r] for r in np.flatnonzero(lab == "discard"))


def test_tab_shows_groups_largest_first_with_their_facts(doc):
    view = doc.explorer_view
    assert "Duplicates" in [t.title for t in w(doc, "tabs").tabs]
    cards = w(doc, "dup_groups")
    assert not cards.visible  # only while the tab is open
    open_tab(doc)
    assert cards.visible
    text = cards.text
    assert text.index("data-group='0'") < text.index("data-group='1'")
    assert text.count("class='ex-dup-card'") == 5
    assert "900 x 700 px" in text and "KB" in text and "sharpness" in text
    assert view.state.keys[2] in text
    assert "2 groups, 5 images" in w(doc, "dup_note").text


def test_served_the_files_are_read_off_the_event_loop(doc, monkeypatch):
    """Served, the members' files (headers, and one decode each for "sharpest": 31 s at
    6,000 members) are read in the pool; the tab says so, then draws, and the rule applies
    once they are in."""
    import threading

    from explorer.curation import dedupe

    view = doc.explorer_view
    drain = served_on_ticks(view)
    read_in = set()
    real = dedupe.sharpness_of
    monkeypatch.setattr(dedupe, "sharpness_of",
                        lambda f, *a: read_in.add(threading.current_thread().name) or real(f, *a))
    w(doc, "dup_rule").value = "sharpest"  # the tab is closed: nothing read yet
    assert not read_in
    open_tab(doc)
    assert "reading the group members' files" in w(doc, "dup_note").text
    assert w(doc, "dup_groups").text == ""
    drain()
    assert read_in and threading.main_thread().name not in read_in
    assert w(doc, "dup_groups").text.count("class='ex-dup-card'") == 5
    assert "sharpness" in w(doc, "dup_groups").text
    click(w(doc, "dup_apply"))  # everything is read: applied at once
    assert len(marks(doc)) == 3


def test_rule_override_undo_and_export(doc):
    st = doc.explorer_view.state
    keys = st.keys
    open_tab(doc)
    w(doc, "dup_rule").value = "largest"
    click(w(doc, "dup_apply"))
    # group 0 keeps row 2 (900 x 700), group 1 keeps one of rows 10, 11
    assert keys[2] not in marks(doc)
    assert len(marks(doc)) == 3 and {keys[3], keys[4]} <= set(marks(doc))
    assert "data-state='kept'" in w(doc, "dup_groups").text
    # the CSV of what would be removed lists exactly the marked images
    csv = pd.read_csv(io.StringIO(w(doc, "dup_removal").data["csv"][0]))
    assert sorted(csv["path"]) == marks(doc)
    assert set(csv.loc[csv["group"] == 0, "kept_path"]) == {keys[2]}

    # override in group 0: keep row 4 instead (one more undoable step)
    w(doc, "dup_group").value = "0"
    w(doc, "dup_keep").value = keys[4]
    click(w(doc, "dup_override"))
    assert keys[4] not in marks(doc) and {keys[2], keys[3]} <= set(marks(doc))
    csv = pd.read_csv(io.StringIO(w(doc, "dup_removal").data["csv"][0]))
    assert set(csv.loc[csv["group"] == 0, "kept_path"]) == {keys[4]}

    # exports leave the marked images out
    res = st.save_labels("kept", imagefolder=True)
    with zipfile.ZipFile(res.zip) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
    files = {n.rsplit("/", 1)[1] for n in names}
    assert {Path(k).name for k in marks(doc)}.isdisjoint(files)
    assert Path(keys[4]).name in files and len(names) > 20

    # undo takes the override back (row 4 marked again, row 2 kept), then the rule
    click(w(doc, "dup_undo"))
    assert keys[4] in marks(doc) and keys[2] not in marks(doc)
    click(w(doc, "dup_undo"))
    assert marks(doc) == []


def test_rules_change_the_plan_not_the_marks(doc):
    open_tab(doc)
    w(doc, "dup_rule").value = "shortest"
    csv = pd.read_csv(io.StringIO(w(doc, "dup_removal").data["csv"][0]))
    assert len(csv) == 3 and (csv["rule"] == "shortest").all()
    assert marks(doc) == []  # nothing is marked before "Apply to all groups"
