"""Curation widgets of the app in a real Bokeh Document (buttons fire the Python callbacks)."""

from __future__ import annotations

import base64
import zipfile
import sys
from pathlib import Path

import numpy as np
import pytest
from bokeh.command.util import build_single_handler_application

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import copy_app, click, plot_positions as plot_indices, widget as w, make_app  # noqa: E402

from explorer.app import downloads  # noqa: E402
from explorer.table import sidecar  # noqa: E402

CURATION_WIDGETS = [
    "tabs", "label_input", "apply_label", "discard", "clear_label", "undo", "redo", "label_pick",
    "rename_to", "rename", "merge", "propose", "suggest_table", "suggest_source", "accept_all",
    "accept_selected", "reject", "recluster", "labels_name", "imagefolder", "save_labels",
    "breadcrumbs", "back", "top", "group_id", "group_go", "group_up", "group_select", "overview",
    "meta_file", "meta_key", "meta_join", "tag_column", "tag_value", "select_neighbours", "tap",
]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("curdoc"))


@pytest.fixture
def app(built, tmp_path):
    return copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))


def make_doc(app):
    application = build_single_handler_application(str(app[0]), argv=[str(app[1])])
    return application.create_document()





def test_curation_widgets_are_there_in_tabs(app):
    doc = make_doc(app)
    for name in CURATION_WIDGETS:
        w(doc, name)
    assert [t.title for t in w(doc, "tabs").tabs] == ["Explore", "Label", "Overview", "Metadata", "Find",
                                                     "Treemap", "Duplicates"]
    assert "photographer" in w(doc, "color_by").options  # extra column colours the map


def test_apply_undo_redo_buttons_recolour_the_map(app):
    doc = make_doc(app)
    w(doc, "color_by").value = "label"
    w(doc, "points").selected.indices = plot_indices(doc, 0)
    w(doc, "label_input").value = "tabby"
    click(w(doc, "apply_label"))
    assert "saved:" in w(doc, "status").text
    assert "tabby" in w(doc, "legend").text
    assert any(v == "tabby" for v, _ in w(doc, "labels").options)
    assert "tabby" in w(doc, "grid").text
    assert "tabby" in w(doc, "table_source").data["_label"]
    assert w(doc, "undo").disabled is False and w(doc, "redo").disabled is True
    click(w(doc, "undo"))
    assert "tabby" not in w(doc, "legend").text and w(doc, "redo").disabled is False
    click(w(doc, "redo"))
    assert "tabby" in w(doc, "legend").text


def test_rename_and_merge_from_the_label_picker(app):
    doc = make_doc(app)
    w(doc, "color_by").value = "label"
    w(doc, "label_pick").value = "coffee"
    w(doc, "rename_to").value = "espresso"
    click(w(doc, "rename"))
    assert "espresso" in w(doc, "label_pick").options and "coffee" not in w(doc, "label_pick").options
    w(doc, "label_pick").value = "espresso"
    w(doc, "rename_to").value = "rocket"
    click(w(doc, "merge"))
    counts = doc.explorer_view.state.label_counts()
    assert counts["rocket"] == 16 and "espresso" not in counts


def test_other_sessions_changes_arrive_by_polling(app):
    a, b = make_doc(app), make_doc(app)
    w(b, "color_by").value = "label"
    w(a, "points").selected.indices = plot_indices(a, 3)
    w(a, "label_input").value = "from tab A"
    click(w(a, "apply_label"))
    assert "from tab A" not in w(b, "legend").text
    b.explorer_view.poll()  # what the periodic callback does every second
    assert "from tab A" in w(b, "legend").text
    assert "another session" in w(b, "status").text


def test_tap_shows_neighbours_with_distances(app):
    doc = make_doc(app)
    i = plot_indices(doc, 2)[0]
    w(doc, "points").selected.indices = [i]
    grid = w(doc, "grid").text
    assert grid.count("distance ") == 12 and "this image" in grid
    assert w(doc, "select_neighbours").visible
    click(w(doc, "select_neighbours"))
    assert len(w(doc, "points").selected.indices) == 13


def test_recluster_shows_submap_with_breadcrumbs_and_back(app):
    doc = make_doc(app)
    n_all = len(w(doc, "points").data["x"])
    w(doc, "points").selected.indices = plot_indices(doc, 2) + plot_indices(doc, 3)
    click(w(doc, "recluster"))
    assert len(w(doc, "points").data["x"]) == 16
    assert "sel" in w(doc, "breadcrumbs").text and w(doc, "back").visible
    assert w(doc, "color_by").value == "subcluster"
    assert {v for v, _ in w(doc, "labels").options} == {"sel.1", "sel.2"}
    click(w(doc, "back"))
    assert len(w(doc, "points").data["x"]) == n_all
    assert not w(doc, "back").visible and w(doc, "breadcrumbs").text == ""
    assert len(w(doc, "points").selected.indices) == 16


def test_overview_tab_builds_lazily_and_navigates(app):
    doc = make_doc(app)
    st = doc.explorer_view.state
    assert st.tree is None
    w(doc, "tabs").active = 2
    assert st.tree is not None
    buttons = [b for b in (w(doc, f"group_{i}") for i in range(16)) if b.visible]
    assert 2 <= len(buttons) <= 16 and "images" in w(doc, "overview").text
    click(buttons[0])
    assert st.overview_id == "root-1" and w(doc, "group_id").value == "root-1"
    click(w(doc, "group_up"))
    assert st.overview_id == "root"
    w(doc, "group_id").value = "2"
    click(w(doc, "group_go"))
    assert st.overview_id == "root-2"
    click(w(doc, "group_select"))
    assert len(w(doc, "points").selected.indices) == st.tree.node("root-2").count


def test_metadata_upload_through_file_input(app):
    doc = make_doc(app)
    meta = b"name,tags\ncat_001.jpg,#beach #sun\ncat_002.jpg,\"beach, snow\"\n"
    upload = w(doc, "meta_file")  # what the browser sends (value and filename are read-only in Python)
    upload.set_from_json("filename", "meta.csv")
    upload.set_from_json("value", base64.b64encode(meta).decode())
    w(doc, "meta_key").value = "name"
    click(w(doc, "meta_join"))
    assert "matched 2 of 35" in w(doc, "status").text
    assert "tags" in w(doc, "color_by").options
    assert w(doc, "tag_column").value == "tags"
    assert ("beach", "beach (2)") in [tuple(o) for o in w(doc, "tag_value").options]
    w(doc, "tag_value").value = "beach"
    assert len(w(doc, "points").selected.indices) == 2


def test_save_labels_button_offers_csv_and_imagefolder_zip(app):
    doc = make_doc(app)
    w(doc, "labels_name").value = "done"
    click(w(doc, "save_labels"))
    names = w(doc, "downloads").data["filename"]
    assert names == ["done.csv", "done.zip"]
    url = w(doc, "downloads").data["url"][1]
    item = downloads.store().lookup(url.split("/")[-2], "done.zip", doc.explorer_view.state.session_key)
    assert zipfile.is_zipfile(item.path)


def test_no_features_keeps_the_app_working(app):
    sidecar(app[1], "features.npy").unlink()
    doc = make_doc(app)
    assert w(doc, "recluster").disabled and w(doc, "propose").disabled
    w(doc, "points").selected.indices = [0]
    assert "distance" not in w(doc, "grid").text
    w(doc, "tabs").active = 2
    assert "features.npy" in w(doc, "status").text


def test_joined_metadata_shows_in_the_table(app):
    doc = make_doc(app)
    upload = w(doc, "meta_file")
    upload.set_from_json("filename", "m.json")
    upload.set_from_json("value", base64.b64encode(b'[{"file": "cat_001.jpg", "season": "summer"}]').decode())
    click(w(doc, "meta_join"))
    assert "season" in [c.title for c in w(doc, "table").columns]
    w(doc, "color_by").value = "season"
    assert "summer" in w(doc, "legend").text
