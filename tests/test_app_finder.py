"""The app's Find tab as a Bokeh Document: search by words and "more like this", the
quality-flag filter, cluster names in the legend and the label MultiSelect.

The data: tests/_finderdata.py (a small app with concepts, cluster names and a few quality
flags set: 3 blurry rows in cluster 1, 2 dark rows in cluster 2, the grey photos grayscale).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import click, copy_app, plot_positions, widget as w, app_document  # noqa: E402
from _finderdata import make_finder_app  # noqa: E402
from _sharedcache import class_vectors_cached  # noqa: E402

from explorer.stages import concepts as C  # noqa: E402
from explorer.app import finder as F  # noqa: E402
from explorer.table import read_table, sidecar, write_table  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_finder_app(tmp_path_factory.mktemp("finder"))


@pytest.fixture
def app(built, tmp_path):
    return copy_app(built[0], built[1], tmp_path / "copy", sidecars=("run.json", "features.npy", "concepts.npz"))


def make_doc(app_dir, csv):
    return app_document(app_dir, csv)


@pytest.fixture
def doc(app, tmp_path_factory):
    # the class-name vectors are cached per user: here in the run's folder, encoded once per
    # run (tests/_sharedcache.py)
    class_vectors_cached(tmp_path_factory)
    return make_doc(*app)


def rows_of(doc, cluster):
    return np.flatnonzero(doc.explorer_view.state.labels("cluster") == str(cluster))


# --------------------------------------------------------------------------- search
@pytest.mark.slow
def test_a_word_query_ranks_the_right_images_first_and_selects_them(doc):
    w(doc, "search_box").value = "a cat"
    view = doc.explorer_view
    rows, scores, what = view.finder.results
    cats = set(rows_of(doc, 0).tolist())
    assert set(rows[:5].tolist()) <= cats, "the five best results are the cat photos"
    assert list(scores) == sorted(scores, reverse=True)
    assert "Egyptian cat" in what or "tabby" in what  # what the words were read as
    # the results are the selection: the map, the table and the grid show them
    assert np.array_equal(view.state.selection, np.unique(rows))
    assert sorted(w(doc, "points").selected.indices) == np.searchsorted(view.plot_rows, np.unique(rows)).tolist()
    assert len(w(doc, "table_source").data["_file"]) == len(rows)
    grid = w(doc, "search_results").text
    first = view.state.project.names_of(rows[:1])[0]
    assert grid.index("#1 &middot;") < grid.index("#2 &middot;") and f"title='{first}'" in grid
    assert "result(s) for" in w(doc, "status").text
    w(doc, "search_box").value = "a cup of coffee"
    rows = view.finder.results[0]
    assert set(rows[:5].tolist()) <= set(rows_of(doc, 1).tolist())
    click(w(doc, "search_clear"))
    assert w(doc, "search_results").text == ""


def test_more_like_this_selects_the_clicked_image_and_its_group(doc):
    more = w(doc, "more_like_this")
    assert more.disabled
    w(doc, "points").selected.indices = plot_positions(doc, 3)[:1]
    assert not more.disabled
    w(doc, "search_top").value = "10"
    click(more)
    rows, scores, _ = doc.explorer_view.finder.results
    assert len(rows) == 10 and rows[0] == rows_of(doc, 3)[0] and scores[0] == pytest.approx(1.0)
    # the 7 other rockets are the nearest; all 10 are selected
    assert set(rows[1:8].tolist()) == set(rows_of(doc, 3)[1:].tolist())
    assert np.array_equal(doc.explorer_view.state.selection, np.unique(rows))


def test_without_a_concepts_file_the_box_says_why_and_searches_nothing(app, tmp_path):
    sidecar(app[1], "concepts.npz").unlink()
    doc = make_doc(*app)
    assert "unavailable" in w(doc, "search_note").text and "concepts.npz" in w(doc, "search_note").text
    w(doc, "search_box").value = "a cat"
    assert "unavailable" in w(doc, "status").text and "ex-error" in w(doc, "status").text
    assert len(doc.explorer_view.state.selection) == 0 and w(doc, "search_results").text == ""


def test_concepts_of_another_build_are_refused_with_a_message(app):
    idx, p = C.load_concepts(sidecar(app[1], "concepts.npz"))
    C.save_concepts(sidecar(app[1], "concepts.npz"), idx[:5], p[:5])
    doc = make_doc(*app)
    w(doc, "search_box").value = "a cat"
    assert "rebuild" in w(doc, "status").text and len(doc.explorer_view.state.selection) == 0


# --------------------------------------------------------------------------- flags
def test_flag_filter_lists_flags_with_counts_and_hides_or_shows_only_them(doc):
    boxes, mode = w(doc, "flag_filter"), w(doc, "flag_mode")
    assert boxes.labels == ["blurry (3)", "dark (2)", "grayscale (3)"]
    n = len(w(doc, "points").data["x"])
    view = doc.explorer_view
    boxes.active = [0, 1]  # hide blurry and dark
    assert len(w(doc, "points").data["x"]) == n - 5
    drawn = set(view.plot_rows.tolist())
    assert not drawn & set(rows_of(doc, 1)[:3].tolist()) and not drawn & set(rows_of(doc, 2)[:2].tolist())
    assert "hiding blurry, dark" in w(doc, "status").text
    # the legend counts and the label filter cover the rows shown
    assert "<span class='ex-count'>5</span>" in w(doc, "legend").text
    w(doc, "labels").value = ["1"]
    assert len(w(doc, "table_source").data["_file"]) == 5
    mode.active = 1  # only the flagged ones
    assert sorted(view.plot_rows.tolist()) == sorted(rows_of(doc, 1)[:3].tolist() + rows_of(doc, 2)[:2].tolist())
    # the 5 selected rows are hidden now: they leave the selection and the MultiSelect
    assert len(view.state.selection) == 0 and w(doc, "labels").value == []
    w(doc, "labels").value = ["1"]
    assert sorted(view.state.selection.tolist()) == rows_of(doc, 1)[:3].tolist()
    # a search finds only what is shown
    w(doc, "search_box").value = "a cat"
    assert set(view.finder.results[0].tolist()) <= set(view.plot_rows.tolist())
    click(w(doc, "reset"))
    assert boxes.active == [] and len(w(doc, "points").data["x"]) == n


def test_no_flags_set_says_so(app):
    df = read_table(app[1])
    df["blurry"] = df["dark"] = df["grayscale"] = 0
    write_table(df, app[1])
    doc = make_doc(*app)
    assert "no image carries a quality flag" in w(doc, "flag_note").text
    assert not w(doc, "flag_filter").visible


# --------------------------------------------------------------------------- names
def test_legend_and_multiselect_name_the_clusters_and_saves_keep_the_name(doc, built):
    names = built[2]
    legend, options = w(doc, "legend").text, dict(w(doc, "labels").options)
    for c in range(4):
        assert names[c] and f"{c}: {names[c]}" in options[str(c)]
        assert f"{c}: {names[c]}" in legend.replace("&#x27;", "'")
    assert "noise (-1)" in options["-1"]
    assert names[0].startswith("cat: ")  # most of cluster 0 is in the folder cat/
    w(doc, "color_by").value = "label"  # names belong to clusters only
    assert not any(": " in t for _, t in w(doc, "labels").options)
    w(doc, "labels").value = []
    w(doc, "points").selected.indices = plot_positions(doc, 2)
    w(doc, "save_name").value = "astro"
    click(w(doc, "save"))
    from explorer.app import downloads

    dl = w(doc, "downloads").data
    item = downloads.store().lookup(dl["url"][0].split("/")[-2], "astro.csv", doc.explorer_view.state.session_key)
    saved = read_table(item.path)
    assert set(saved["cluster_name"]) == {names[2]}


# --------------------------------------------------------------------------- pure parts
def test_flag_keep_and_counts():
    df = pd.DataFrame({"blurry": [1, 0, 0, 1], "dark": [0, 1, 0, 0], "x": 0.0, "y": 0.0})
    assert F.flag_counts(df) == {"blurry": 2, "dark": 1}
    assert F.flag_counts(df, np.array([False, True, True, False])) == {"dark": 1}
    assert F.flag_keep(df, []) is None
    assert F.flag_keep(df, ["blurry", "dark"]).tolist() == [False, False, True, False]
    assert F.flag_keep(df, ["dark"], "only").tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="'fuzzy'"):
        F.flag_keep(df, ["fuzzy"])
    with pytest.raises(ValueError, match="'sometimes'"):
        F.flag_keep(df, ["dark"], "sometimes")
    with pytest.raises(ValueError, match="'grayscale'"):
        F.flag_keep(df, ["grayscale"])


def test_top_rows_ranks_among_allowed_rows():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.7])
    rows, s = F.top_rows(scores, None, 3)
    assert rows.tolist() == [1, 3, 4] and s.tolist() == [0.9, 0.9, 0.7]
    rows, _ = F.top_rows(scores, np.array([True, False, True, True, False]), 10)
    assert rows.tolist() == [3, 2, 0]


def test_cluster_names_and_group_text():
    names = F.cluster_names(np.array(["0", "0", "1", "-1"]), pd.Series(["hats: sombrero", "hats: sombrero", "", "noise"]))
    assert names == {"0": "hats: sombrero", "-1": "noise"}
    assert F.group_text("0", "0", names, "-1") == "0: hats: sombrero"
    assert F.group_text("-1", "noise (-1)", names, "-1") == "noise (-1)"
    assert F.group_text("1", "1", names, "-1") == "1"


def test_row_filter_rejects_a_bad_mask(doc):
    st = doc.explorer_view.state
    with pytest.raises(ValueError, match=r"shape \(35,\)"):
        st.set_row_filter(np.ones(3, dtype=bool))


def test_flag_filter_holds_through_a_drill_down_and_waits_for_the_whole_map(doc):
    from explorer.stages.hierarchy import Recluster

    view, boxes = doc.explorer_view, w(doc, "flag_filter")
    st = view.state
    boxes.active = [0]  # hide blurry
    shown = rows_of(doc, 1)[3:]
    w(doc, "labels").value = ["1"]
    assert st.selection.tolist() == shown.tolist()
    # the drill-down's map (as re-clustering the selection shows it) holds only shown rows
    n = len(shown)
    st.recluster_show(st.selection.copy(), "1", Recluster(
        xy=np.c_[np.arange(n), np.zeros(n)].astype(np.float32), sub_ids=["1.1"] * n,
        labels=np.ones(n, int), notes=[]))
    assert sorted(view.plot_rows.tolist()) == shown.tolist() and boxes.disabled
    boxes.active = [0, 1]  # refused while drilled in: the boxes show the filter in force
    assert boxes.active == [0] and "whole map" in w(doc, "status").text
    click(w(doc, "top"))
    assert not boxes.disabled and len(view.plot_rows) == 35 - 3


def test_flag_filter_and_search_show_on_the_image_map(app, tmp_path_factory, monkeypatch):
    """Above the image threshold the map is a server-rendered image: hiding flagged images
    draws fewer points, and a word search lights its results and dims the rest."""
    class_vectors_cached(tmp_path_factory)
    monkeypatch.setenv("EXPLORER_IMAGE_MAP_ABOVE", "0")
    doc = make_doc(*app)
    view = doc.explorer_view
    assert view.image_mode and len(w(doc, "points").data["x"]) == 0
    source = w(doc, "map_image_source")
    n = source.data["n"][0]
    assert n == view.state.n_rows
    w(doc, "flag_filter").active = [0, 1]  # hide the 3 blurry and 2 dark images
    assert source.data["n"][0] == n - 5
    def alpha():
        img = source.data["image"][0]
        return img.view(np.uint8).reshape(*img.shape, 4)[..., 3]

    before = alpha().copy()
    w(doc, "search_top").value = "10"
    w(doc, "search_box").value = "a cat"
    assert len(view.state.selection) == 10
    assert (alpha() > 100).sum() < (before > 100).sum()  # the others dimmed
    click(w(doc, "reset"))
    assert source.data["n"][0] == n
