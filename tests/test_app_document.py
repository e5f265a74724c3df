"""The app as a Bokeh Document (no browser): widgets, wiring, callbacks, bad input."""

from __future__ import annotations

import shutil
import time
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bokeh.models import LassoSelectTool

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import copy_app, click, plot_positions as plot_index_of, widget as w, HOSTILE, HOSTILE_LABEL, make_app, app_document, served_on_ticks  # noqa: E402

from explorer.app import downloads  # noqa: E402
from explorer.table import read_table  # noqa: E402

WIDGETS = [
    "plot", "points", "scatter", "table", "table_source", "grid", "grid_prev", "grid_next",
    "grid_page", "labels", "only_selected", "clear_labels", "color_by", "legend", "save_name",
    "save_images", "save", "downloads", "reset", "point_size", "status", "title", "color_mapper",
]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("docdata"))


@pytest.fixture
def app(built, tmp_path):
    return copy_app(*built, tmp_path / "copy")


def make_doc(app_dir, argv):
    return app_document(app_dir, *argv)


@pytest.fixture
def doc(app):
    return make_doc(app[0], [app[1]])





def test_every_widget_is_there(doc):
    for name in WIDGETS:
        w(doc, name)
    plot = w(doc, "plot")
    assert plot.output_backend == "webgl"
    lasso = plot.select_one(LassoSelectTool)
    assert lasso.continuous is False
    tools = {type(t).__name__ for t in plot.tools}
    assert {"PanTool", "LassoSelectTool", "BoxZoomTool", "BoxSelectTool", "WheelZoomTool",
            "SaveTool", "ResetTool", "HoverTool"} <= tools  # fmt: skip
    assert len(w(doc, "points").data["x"]) == 35
    assert "error" not in w(doc, "status").text


def test_one_lasso_fires_the_selection_callback_once(doc):
    src, labels = w(doc, "points"), w(doc, "labels")
    fired = {"indices": 0, "labels": 0, "state": 0}
    src.selected.on_change("indices", lambda a, o, n: fired.__setitem__("indices", fired["indices"] + 1))
    labels.on_change("value", lambda a, o, n: fired.__setitem__("labels", fired["labels"] + 1))
    doc.explorer_view.state.subscribe(lambda what: fired.__setitem__("state", fired["state"] + 1))
    src.selected.indices = plot_index_of(doc, 1)[:5]
    assert doc.explorer_view.selection_callbacks == 1
    assert fired == {"indices": 1, "labels": 1, "state": 1}


def test_lasso_fills_table_grid_and_multiselect(doc):
    idx = plot_index_of(doc, 0) + plot_index_of(doc, 2)[:2]
    w(doc, "points").selected.indices = idx
    assert w(doc, "labels").value == ["0", "2"]
    table = w(doc, "table_source").data
    assert len(table["_file"]) == len(idx)
    assert HOSTILE in table["_file"]
    grid = w(doc, "grid").text
    assert grid.count("<figure") == len(idx)
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in grid and HOSTILE not in grid
    assert "images 1-10 of 10" in w(doc, "grid_page").text


def test_table_shows_every_column_and_the_hostile_name_as_data(doc):
    """The table carries names as plain data (the browser test checks they render as text)."""
    table = w(doc, "table")
    titles = [c.title for c in table.columns]
    assert {"file name", "label", "path", "x", "y", "cluster", "photographer"} <= set(titles)
    w(doc, "labels").value = ["0"]
    data = w(doc, "table_source").data
    assert HOSTILE in data["_file"]
    assert all(u.startswith("/app/_thumb/") and u[len("/app/_thumb/"):].isdigit() for u in data["_thumb"])


def test_choosing_labels_selects_their_points(doc):
    w(doc, "labels").value = ["3"]
    assert sorted(w(doc, "points").selected.indices) == sorted(plot_index_of(doc, 3))
    assert len(w(doc, "table_source").data["_file"]) == 8


def test_only_change_selected_round_trip(doc):
    src, labels = w(doc, "points"), w(doc, "labels")
    lassoed = plot_index_of(doc, 0)[:3] + plot_index_of(doc, 1)[:4]
    src.selected.indices = lassoed
    w(doc, "only_selected").active = True
    labels.value = ["1"]
    assert sorted(src.selected.indices) == sorted(plot_index_of(doc, 1)[:4])
    labels.value = ["0", "1"]
    assert sorted(src.selected.indices) == sorted(lassoed)


def test_clear_then_save_writes_nothing(doc, app):
    w(doc, "labels").value = ["0", "1"]
    click(w(doc, "clear_labels"))
    assert w(doc, "labels").value == [] and list(w(doc, "points").selected.indices) == []
    assert len(w(doc, "table_source").data["_file"]) == 0
    click(w(doc, "save"))
    assert "nothing selected" in w(doc, "status").text
    assert not (app[0] / "exports").exists() or not list((app[0] / "exports").iterdir())


def test_save_writes_csv_and_zip_and_offers_downloads(doc, app):
    w(doc, "points").selected.indices = plot_index_of(doc, 2)
    w(doc, "save_name").value = "astro"
    w(doc, "save_images").active = True
    click(w(doc, "save"))
    dl = w(doc, "downloads").data
    assert dl["filename"] == ["astro.csv", "astro.zip"]
    tokens = [u.split("/")[-2] for u in dl["url"]]
    assert dl["url"] == [f"/app/_exports/{tokens[0]}/astro.csv", f"/app/_exports/{tokens[1]}/astro.zip"]
    assert dl["cookie_path"] == [u.rsplit("/", 1)[0] + "/" for u in dl["url"]]
    key = doc.explorer_view.state.session_key
    csv_item = downloads.store().lookup(tokens[0], "astro.csv", key)
    assert len(read_table(csv_item.path)) == 8
    assert not (app[0] / "exports").exists() and not (app[0] / "static" / "exports").exists()
    assert "saved 8 row(s)" in w(doc, "status").text


def test_save_refuses_path_tricks_with_a_message(doc, app):
    w(doc, "points").selected.indices = plot_index_of(doc, 2)
    w(doc, "save_name").value = "../../etc/evil"
    click(w(doc, "save"))
    assert "refused" in w(doc, "status").text
    assert not (app[0] / "exports").exists() or not list((app[0] / "exports").iterdir())
    assert not list(app[0].parent.parent.glob("**/evil*"))


def test_colour_by_label_handles_string_labels(doc):
    w(doc, "color_by").value = "label"
    options = [v for v, _ in w(doc, "labels").options]
    assert HOSTILE_LABEL in options and "cat" in options
    palette = w(doc, "color_mapper").palette
    colors = {palette[c] for c in w(doc, "points").data["code"]}
    assert len(colors) == 6  # cat, <b>bold</b>, coffee, astronaut, rocket, camera
    legend = w(doc, "legend").text
    assert "&lt;b&gt;bold&lt;/b&gt;" in legend and HOSTILE_LABEL not in legend
    w(doc, "labels").value = ["coffee"]
    assert sorted(w(doc, "points").selected.indices) == sorted(plot_index_of(doc, 1))


def test_point_size_uses_value_throttled(doc):
    w(doc, "point_size").set_from_json("value_throttled", 11)
    assert w(doc, "scatter").glyph.size == 11


def test_grid_pages(app, tmp_path):
    import explorer.app.view as v

    doc = make_doc(app[0], [app[1]])
    w(doc, "points").selected.indices = list(range(35))
    assert v.GRID_PAGE >= 35 and w(doc, "grid").text.count("<figure") == 35

    old = v.GRID_PAGE
    v.GRID_PAGE = 10
    try:
        w(doc, "points").selected.indices = list(range(25))
        assert w(doc, "grid").text.count("<figure") == 10
        click(w(doc, "grid_next"))
        click(w(doc, "grid_next"))
        assert w(doc, "grid").text.count("<figure") == 5
        assert "page 3 of 3" in w(doc, "grid_page").text
        assert w(doc, "grid_next").disabled
    finally:
        v.GRID_PAGE = old


def test_reset_data(doc):
    initial_size = w(doc, "scatter").glyph.size
    w(doc, "points").selected.indices = plot_index_of(doc, 1)
    w(doc, "only_selected").active = True
    w(doc, "color_by").value = "label"
    w(doc, "point_size").set_from_json("value_throttled", 9)
    click(w(doc, "reset"))
    assert list(w(doc, "points").selected.indices) == []
    assert w(doc, "labels").value == [] and w(doc, "only_selected").active is False
    assert w(doc, "color_by").value == "cluster" and w(doc, "scatter").glyph.size == initial_size
    assert len(w(doc, "table_source").data["_file"]) == 0


def test_two_sessions_share_nothing(app):
    a, b = make_doc(app[0], [app[1]]), make_doc(app[0], [app[1]])
    w(a, "points").selected.indices = plot_index_of(a, 1)
    w(a, "color_by").value = "label"
    assert list(w(b, "points").selected.indices) == [] and w(b, "labels").value == []
    assert w(b, "color_by").value == "cluster"
    assert a.explorer_view.state is not b.explorer_view.state


def test_works_from_another_directory_with_relative_csv(app, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rel_csv = Path("..") / "copy" / app[1].name
    doc = make_doc(app[0], [rel_csv])
    w(doc, "points").selected.indices = plot_index_of(doc, 0)
    w(doc, "save_images").active = True
    click(w(doc, "save"))
    assert "8 original image(s)" in w(doc, "status").text
    assert w(doc, "downloads").data["filename"] == ["selection.csv", "selection.zip"]
    assert not (elsewhere / "exports").exists() and not list(elsewhere.iterdir())


def test_csv_found_beside_app_without_args(app):
    doc = make_doc(app[0], [])
    assert len(w(doc, "points").data["x"]) == 35


# ----------------------------------------------------------------------------- bad input
def test_no_csv_anywhere_shows_error_page(tmp_path):
    app_dir = tmp_path / "lonely"
    shutil.copytree(Path(__file__).resolve().parents[1] / "app_files", app_dir)
    doc = make_doc(app_dir, [])
    status = w(doc, "status").text
    assert "no CSV given" in status and "bokeh serve lonely --args lonely.csv" in status
    assert doc.select_one({"name": "plot"}) is None


def test_missing_xy_shows_error_instead_of_plot(app):
    df = pd.read_csv(app[1]).drop(columns=["x"])
    df.to_csv(app[1], index=False)
    doc = make_doc(app[0], [app[1]])
    assert "missing column(s) x" in w(doc, "status").text
    assert doc.select_one({"name": "plot"}) is None


def test_unreadable_csv_shows_error(app):
    app[1].write_bytes(b"\xff\xfe\x00garbage\x00\n\x00")
    doc = make_doc(app[0], [app[1]])
    assert "ex-error" in w(doc, "status").text


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda df: df.drop(columns=["cluster", "probability"]), "missing column(s): cluster, probability"),
        (lambda df: df.assign(mystery=1), None),
        (lambda df: df.iloc[:0], "no rows"),
        (lambda df: df.assign(x=np.where(np.arange(len(df)) < 3, np.nan, df["x"])), "3 row(s) have no valid x/y"),
        (lambda df: df.assign(image="static/thumbs/nope.jpg"), "35 of 35 thumbnail(s) not found"),
    ],
    ids=["missing-columns", "unknown-column", "no-rows", "nan-xy", "missing-images"],
)
def test_bad_csv_still_starts_and_says_what_is_wrong(app, change, expect):
    df = change(pd.read_csv(app[1]))
    df.to_csv(app[1], index=False)
    doc = make_doc(app[0], [app[1]])
    w(doc, "plot")  # the map is there
    status = w(doc, "status").text
    if expect:
        assert expect in status and "ex-warning" in status
    else:
        assert "ex-warning" not in status
    # and selecting every drawn point still works
    n = len(w(doc, "points").data["x"])
    w(doc, "points").selected.indices = list(range(n))
    assert len(w(doc, "table_source").data["_file"]) == n


def test_any_failure_while_loading_shows_the_error_page(app, monkeypatch):
    """H5: not only the expected errors; anything raised while building shows the page."""
    from explorer.app.state import AppState

    def boom(*a, **k):
        raise KeyError("something nobody expected")

    monkeypatch.setattr(AppState, "from_csv", classmethod(lambda cls, *a, **k: boom()))
    doc = make_doc(app[0], [app[1]])
    assert doc.select_one({"name": "plot"}) is None
    assert "something nobody expected" in w(doc, "status").text


def test_csv_with_no_relative_thumbnails_opens_with_a_note(app):
    """H5: a CSV from ``explorer build --out X.csv`` (image column empty) or with https:// thumbnails."""
    for images in ("", "https://elsewhere.example/t.jpg"):
        df = pd.read_csv(app[1])
        df["image"] = images
        df.to_csv(app[1], index=False)
        doc = make_doc(app[0], [app[1]])
        assert len(w(doc, "points").data["x"]) == 35
        assert "not paths inside the app" in w(doc, "status").text
        assert "elsewhere.example" not in str(w(doc, "hover").tooltips)


def test_map_is_sent_once_as_binary_columns_and_reset_or_filters_do_not_resend_it(doc):
    """M7: float32/int32 columns, thumbnails as row numbers, no per-row URL strings; Reset,
    the label filter and colour changes never replace the whole source."""
    src = w(doc, "points")
    data = src.data
    assert data["x"].dtype == np.float32 and data["y"].dtype == np.float32
    assert data["code"].dtype == np.int32 and data["row"].dtype == np.int32
    assert set(data) == {"x", "y", "code", "row", "name"}  # no thumbnail URL strings
    # the session's columns are the shared project's arrays, not copies
    project = doc.explorer_view.state.project
    assert data["x"] is project.x32 and data["row"] is project.rows
    replaced = []
    src.on_change("data", lambda attr, old, new: replaced.append(sorted(new)))
    w(doc, "labels").value = ["1", "2"]
    click(w(doc, "clear_labels"))
    w(doc, "points").selected.indices = plot_index_of(doc, 3)
    click(w(doc, "reset"))
    assert replaced == []
    w(doc, "color_by").value = "label"
    assert all(keys == sorted(data) for keys in replaced)  # a patch of the code column at most
    assert w(doc, "points").data["x"] is project.x32


def test_zoomed_in_thumbnails_are_drawn_by_a_throttled_client_callback(doc):
    """The image glyph's source is filled in the browser from the points in view (checked
    end to end in the browser test); here: wired to both ranges, limited, no server trip."""
    view = doc.explorer_view
    thumbs = w(doc, "thumbs")
    assert thumbs.data_source is w(doc, "thumbs_source") and thumbs.glyph.url == "url"
    for rng in (view.plot.x_range, view.plot.y_range):
        cbs = rng.js_property_callbacks
        assert "change:start" in cbs and "change:end" in cbs
        code = cbs["change:start"][0].code
        assert "setTimeout" in code and cbs["change:start"][0].args["limit"] == 300
    assert view.lasso_renderers() == [view.renderer]


def test_a_stale_background_result_is_dropped(built, tmp_path):
    """L12: neighbours found for an image the person has already left are not shown."""
    app = copy_app(*built, tmp_path / "with-features", sidecars=("run.json", "features.npy"))
    doc = make_doc(app[0], [app[1]])
    view = doc.explorer_view
    ticks = []

    class Served:  # what bokeh serve gives a session: a context and a next-tick queue
        session_context = object()

        def add_next_tick_callback(self, cb):
            ticks.append(cb)

    view.doc = Served()
    first, second = plot_index_of(doc, 2)[0], plot_index_of(doc, 3)[0]
    w(doc, "points").selected.indices = [first]
    assert view.state.neighbours is None  # searched in the pool, not on the event loop
    deadline = time.monotonic() + 20
    while not ticks and time.monotonic() < deadline:
        time.sleep(0.02)
    w(doc, "points").selected.indices = [second]  # the person moved on meanwhile
    ticks.pop(0)()
    assert view.state.neighbours is None
    while not ticks and time.monotonic() < deadline:
        time.sleep(0.02)
    ticks.pop(0)()
    assert view.state.neighbours is not None and view.state.neighbours[0] == view.plot_rows[second]


# --------------------------------------------------------------------------- big maps: one image
def send_geometry(doc, kind, xs, ys, mode="replace", seq=[0]):
    """What the page's select-tool callback sends in image mode: the shape, not the points."""
    seq[0] += 1
    n = len(xs)
    w(doc, "lasso_geometry").data = {"x": list(xs), "y": list(ys), "kind": [kind] * n, "mode": [mode] * n,
                                     "seq": [seq[0]] * n}  # fmt: skip


def inside(px, py, x, y):
    """Even-odd point-in-polygon, plain numpy (the reference)."""
    res = np.zeros(len(x), dtype=bool)
    for i in range(len(px)):
        ax, ay, bx, by = px[i], py[i], px[(i + 1) % len(px)], py[(i + 1) % len(px)]
        with np.errstate(divide="ignore", invalid="ignore"):
            res ^= ((ay > y) != (by > y)) & (x < ax + (y - ay) * (bx - ax) / (by - ay))
    return res


@pytest.fixture
def image_doc(app, monkeypatch):
    monkeypatch.setenv("EXPLORER_IMAGE_MAP_ABOVE", "10")
    return make_doc(app[0], [app[1]])


def image_rgba(doc):
    img = w(doc, "map_image_source").data["image"][0]
    return img.view(np.uint8).reshape(*img.shape, 4)


def test_image_map_replaces_the_dots_above_the_threshold(image_doc):
    doc = image_doc
    view = doc.explorer_view
    assert view.image_mode and len(w(doc, "points").data["x"]) == 0
    assert w(doc, "map_image").visible and not w(doc, "scatter").visible
    data = w(doc, "map_image_source").data
    assert data["n"] == data["total"] == [35]
    assert (image_rgba(doc)[..., 3] > 0).sum() > 35  # every point drawn (spread over a few pixels)
    # the select tools hit only the invisible two-point bounds: the page never sends a point list
    bounds = w(doc, "map_bounds")
    assert view.lasso_renderers() == [bounds] and len(bounds.data_source.data["x"]) == 2
    # the ranges fit the data, not the image (which follows the ranges)
    assert view.plot.x_range.renderers == [bounds]


def test_image_map_lasso_modes_and_click(image_doc):
    doc = image_doc
    view, st = doc.explorer_view, doc.explorer_view.state
    x, y = st.xy()
    clusters = st.labels("cluster")
    send_geometry(doc, "poly", [-3, 13, 13, -3], [-3, -3, 3, 3])  # clusters 0 and 1
    assert set(clusters[st.selection]) == {"0", "1"} and len(st.selection) == 16
    assert w(doc, "labels").value == ["0", "1"] and len(w(doc, "table_source").data["_file"]) == 16
    assert view.selection_callbacks == 1
    dimmed = image_rgba(doc)
    send_geometry(doc, "rect", [-3, 3, 3, -3], [7, 7, 13, 13], mode="append")  # + cluster 2
    assert set(clusters[st.selection]) == {"0", "1", "2"}
    send_geometry(doc, "rect", [-3, 3], [-3, 13], mode="subtract")  # - clusters 0 and 2
    assert set(clusters[st.selection]) == {"1"}
    send_geometry(doc, "poly", [7, 13, 13], [-3, -3, 3], mode="intersect")  # a triangle of cluster 1
    want = np.flatnonzero(inside([7, 13, 13], [-3, -3, 3], x, y) & (clusters == "1"))
    assert 0 < len(want) < 8 and st.selection.tolist() == want.tolist()
    # a click picks the nearest point within a few pixels; Shift-click toggles it
    r = int(np.flatnonzero(clusters == "3")[0])
    send_geometry(doc, "point", [x[r] + 0.01], [y[r]])
    assert st.selection.tolist() == [r]
    send_geometry(doc, "point", [x[r]], [y[r]], mode="toggle")
    assert len(st.selection) == 0
    send_geometry(doc, "point", [100.0], [100.0])  # empty space: nothing
    assert len(st.selection) == 0
    assert (image_rgba(doc)[..., 3] > dimmed[..., 3]).any()  # nothing selected: nothing dimmed


def test_image_map_follows_colours_filters_zoom_and_reset(image_doc):
    from bokeh.events import RangesUpdate

    doc = image_doc
    view = doc.explorer_view
    before = image_rgba(doc).copy()
    w(doc, "color_by").value = "label"
    assert not np.array_equal(image_rgba(doc), before)
    w(doc, "labels").value = ["cat"]  # a filter selects: the others are dimmed
    assert len(view.state.selection) == 7  # (the eighth cat has the hostile label)
    lit = (image_rgba(doc)[..., 3] > 100).sum()
    assert lit < (before[..., 3] > 100).sum()
    # a zoom (what the browser's tools announce): the image covers the new range, fewer points
    view.plot._trigger_event(RangesUpdate(view.plot, x0=-2, x1=2, y0=-2, y1=2))
    data = w(doc, "map_image_source").data
    assert data["x"] == [-2] and data["dw"] == [4] and 0 < data["n"][0] < 35
    assert len(w(doc, "thumbs_source").data["url"]) == data["n"][0]  # few in view: their thumbnails
    click(w(doc, "reset"))
    assert len(view.state.selection) == 0 and w(doc, "color_by").value == "cluster"


def test_a_lasso_on_a_million_rows_sends_a_polygon_and_no_point_list():
    """Issue 8: at 1M rows no per-point column or index list travels either way: the page
    gets one image, sends the lasso's vertices, and gets back the table and a new image."""
    from bokeh.document import Document
    from bokeh.protocol import Protocol

    from explorer.app.state import AppState
    from explorer.app.view import TABLE_LIMIT, AppView

    n = 1_000_000
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, n).astype(np.float32)
    y = rng.normal(0, 5, n).astype(np.float32)
    df = pd.DataFrame({"path": [f"i/{i}.jpg" for i in range(n)], "image": "", "x": x, "y": y,
                       "cluster": rng.integers(-1, 30, n)})  # fmt: skip
    view = AppView(AppState(df))
    doc = Document()
    doc.add_root(view.layout)
    assert view.image_mode and len(w(doc, "points").data["x"]) == 0
    sent = [len(v) for m in doc.models if hasattr(m, "data") and m.name != "map_image_source" for v in m.data.values()]
    assert max(sent) <= TABLE_LIMIT  # no per-point column in the page
    assert w(doc, "map_image_source").data["n"] == [n]

    events = []
    doc.on_change(lambda event: events.append(event))
    px, py = [-4, 6, 8, 1, -6], [-5, -6, 2, 7, 3]
    send_geometry(doc, "poly", px, py)
    want = np.flatnonzero(inside(px, py, x.astype(np.float64), y.astype(np.float64)))
    assert len(want) > 100_000
    assert np.array_equal(view.state.selection, want)
    assert f"{len(want):,}" in w(doc, "table_info").text
    assert len(w(doc, "table_source").data["_file"]) == TABLE_LIMIT
    assert len(w(doc, "points").selected.indices) == 0
    # what goes back to the page: the table, the widgets and one image of the plot's size
    msg = Protocol().create("PATCH-DOC", [e for e in events if getattr(e, "model", None) is not w(doc, "lasso_geometry")])
    image_bytes = w(doc, "map_image_source").data["image"][0].nbytes
    sizes = sorted(memoryview(b.data).nbytes for b in msg.buffers)
    assert sizes[-1] == image_bytes and all(s < 100_000 for s in sizes[:-1]), sizes[-5:]
    assert len(msg.content) < 2_000_000


def test_no_background_job_enters_catch_warnings_in_a_thread(built, tmp_path, monkeypatch):
    """M4: ``warnings.catch_warnings`` is process-global and not thread-safe. Every job the
    served app runs in its thread pool (suggestions, neighbours, overview, saves with
    images, tag counts, map images) runs here in that pool, and none of our code may enter
    it there; the re-cluster (UMAP + HDBSCAN, which wrap whole fits in it) goes to the
    worker process. (pandas enters it briefly inside dtype checks, in any thread: not ours.)"""
    import threading
    import warnings
    from concurrent.futures import Future

    from explorer.app import work

    entered = []

    import explorer

    ours = str(Path(explorer.__file__).parent)

    class Spy(warnings.catch_warnings):
        def __enter__(self):
            caller = sys._getframe(1).f_code.co_filename  # our code, not pandas' brief internal use
            if threading.current_thread() is not threading.main_thread() and caller.startswith(ours):
                entered.append(f"{caller}:{sys._getframe(1).f_lineno}")
            return super().__enter__()

    monkeypatch.setattr(warnings, "catch_warnings", Spy)
    sent_to_process = []

    class Processes:  # the worker process itself is not started here (numba compiles for long)
        def submit(self, fn, *args):
            sent_to_process.append(fn)
            fut = Future()
            fut.set_result(ValueError("not run in this test"))
            return fut

    monkeypatch.setattr(work, "processes", lambda: Processes())
    monkeypatch.setenv("EXPLORER_IMAGE_MAP_ABOVE", "10")
    app = copy_app(*built, tmp_path / "m4", sidecars=("run.json", "features.npy"))
    doc = make_doc(app[0], [app[1]])
    view = doc.explorer_view
    drain = served_on_ticks(view)

    send_geometry(doc, "poly", [-3, 13, 13, -3], [-3, -3, 3, 3])  # image map re-rendered
    drain()
    w(doc, "label_input").value = "mug"
    click(w(doc, "apply_label"))
    click(w(doc, "propose"))
    drain()
    assert "suggestions" in w(doc, "status").text  # the search ran (in the pool)
    click(w(doc, "recluster"))
    drain()
    w(doc, "tabs").active = 2  # the overview
    drain()
    w(doc, "save_images").active = True
    click(w(doc, "save"))
    drain()
    assert "saved" in w(doc, "status").text
    w(doc, "tag_column").value = "photographer"
    drain()
    r = int(view.plot_rows[0])
    send_geometry(doc, "point", [view.state.xy()[0][r]], [view.state.xy()[1][r]])  # one image: neighbours
    drain()
    assert view.state.neighbours is not None and view.state.neighbours[0] == r
    # the Label tab: the picks (k-means) and the model run in the pool too
    flow = view.labelling.flow
    keys = view.state.keys
    # the built app's images all have labels: six are left, in two classes
    view.state.assign_labels(lambda: {k: ("a" if i % 2 else "b") if i < 6 else ""
                                      for i, k in enumerate(keys)}, "six labels")
    click(w(doc, "label_next"))
    drain()
    assert flow.batch
    click(w(doc, "propagate"))
    drain()
    assert flow.info is not None and flow.info["estimated_accuracy"] is not None
    click(w(doc, "label_next"))
    drain()
    assert entered == []
    assert sent_to_process == [work.recluster_in_worker]


def test_big_renders_run_off_the_event_loop_and_the_newest_view_wins(image_doc, monkeypatch):
    """Served, renders of many points run in the map's own thread; a burst of zoom steps
    ends with the image of the last one (the ones in between may be skipped)."""
    from bokeh.events import RangesUpdate

    from explorer.app import mapimage

    monkeypatch.setattr(mapimage, "INLINE_POINTS", 0)  # "many points" for a 35-point map
    doc = image_doc
    view = doc.explorer_view
    drain = served_on_ticks(view)
    before = view.image_map.renders
    for x0 in (-5.0, -4.0, -3.0):  # three wheel steps before any render is back
        view.plot._trigger_event(RangesUpdate(view.plot, x0=x0, x1=3.0, y0=-3.0, y1=3.0))
    assert view.image_map._running and view.image_map.renders == before  # nothing drawn on the loop
    drain(timeout=20)
    data = w(doc, "map_image_source").data
    assert data["x"] == [-3.0] and data["dw"] == [6.0]
    assert view.image_map.renders == before + 1  # the first result was stale: only the last shown
