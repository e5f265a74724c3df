"""Bokeh wiring of the explorer app: widgets read and write an :class:`AppState`.

Every widget and source has a ``name=`` (tests find them with ``doc.select_one``).
Views re-render from the state when it reports a change; widget callbacks only call
state methods. One :class:`AppView` (and one state) per session; the data behind it is the
process's :class:`explorer.app.project.Project`, and the map's columns are the project's own
numpy arrays (sent to the browser once, as binary float32/int32 columns).

Above :func:`explorer.app.density.image_threshold` points the map is one server-rendered
image instead (:mod:`explorer.app.mapimage`): no per-point column or index list travels.

Thumbnails travel as row numbers: the browser asks ``/<route>/_thumb/<row>`` (our handler,
:mod:`explorer.app.downloads`), so no per-row URL strings are sent. When a few hundred points
are in view, the thumbnails themselves are drawn at their positions (client-side, throttled).
Slow work (saves, joins, tag counts, neighbours, propagation, re-cluster, overview) runs in
the process-wide pools of :mod:`explorer.app.work` with a "working..." message.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from bokeh.layouts import column, row
from bokeh.models import (
    Button,
    Checkbox,
    ImageURL,
    FileInput,
    TabPanel,
    Tabs,
    TapTool,
    ColumnDataSource,
    CustomJS,
    CustomJSHover,
    DataTable,
    Div,
    HoverTool,
    HTMLTemplateFormatter,
    ImportedStyleSheet,
    LassoSelectTool,
    LinearColorMapper,
    MultiSelect,
    NumberFormatter,
    Select,
    Slider,
    StringEditor,
    StringFormatter,
    TableColumn,
    TextInput,
    Toggle,
    BoxSelectTool,
)
from bokeh.plotting import figure

from explorer.app.density import image_threshold
from explorer.app.finder import Finder
from explorer.app.labelling import LabellingPanel
from explorer.app.mapimage import ImageMap
from explorer.app.project import thumb_url_prefix
from explorer.app.state import AppState, ExportError

#: the DataTable shows at most this many selected rows (Save writes all of them)
TABLE_LIMIT = 2000
#: the suggestions table shows at most this many (most confident first)
SUGGEST_LIMIT = 2000
#: thumbnails per page of the selection grid
GRID_PAGE = 40
PLOT_WIDTH, PLOT_HEIGHT = 760, 620
SIDEBAR_WIDTH = 300
#: file names go into the map's source (for the hover) only up to this many points
NAME_LIMIT = 200_000
#: the hover names at most this many groups of the colour column (then "group #code")
HOVER_LABEL_LIMIT = 20_000
#: draw thumbnails instead of dots when at most this many points are in view
THUMBS_IN_VIEW = 300
#: their size on screen (pixels)
THUMB_PX = 44

_DOWNLOAD_JS = """
const d = source.data;
const urls = d["url"] || [];
const names = d["filename"] || [];
const paths = d["cookie_path"] || [];
// the session key travels only over this session's websocket; the export handler wants it
// back in a cookie scoped to the one export's path
for (let i = 0; i < paths.length; i++) {
  document.cookie = "explorer_dl=" + key + "; path=" + paths[i] + "; SameSite=Strict";
}
for (let i = 0; i < urls.length; i++) {
  const a = document.createElement("a");
  a.href = urls[i];
  a.download = names[i];
  a.style.display = "none";
  document.body.appendChild(a);
  a.click();
  a.remove();
}
"""

_TOOLTIP = """
<div style="max-width:180px">
  <img src="@row{custom}" alt="" style="max-width:160px;max-height:160px;display:block;margin-bottom:4px">
  <div style="font-weight:600;word-break:break-all">@name</div>
  <div>@code{custom}</div>
</div>
"""
_TOOLTIP_NO_NAME = _TOOLTIP.replace('<div style="font-weight:600;word-break:break-all">@name</div>', "")

#: the thumbnails in view (client-side; throttled; nothing goes to the server)
_THUMBS_JS = """
if (image.visible) return;  // image mode: the server sends the thumbnails in view
if (thumbs._ex_timer) clearTimeout(thumbs._ex_timer);
thumbs._ex_timer = setTimeout(() => {
  const d = points.data, xs = d.x, ys = d.y, rows = d.row;
  const xa = Math.min(xr.start, xr.end), xb = Math.max(xr.start, xr.end);
  const ya = Math.min(yr.start, yr.end), yb = Math.max(yr.start, yr.end);
  const url = [], x = [], y = [];
  let n = 0;
  for (let i = 0; i < xs.length; i++) {
    const a = xs[i], b = ys[i];
    if (a >= xa && a <= xb && b >= ya && b <= yb) {
      if (++n > limit) break;
      url.push(prefix + rows[i]); x.push(a); y.push(b);
    }
  }
  if (n > limit) { if (thumbs.data.url.length) thumbs.data = {url: [], x: [], y: []}; }
  else thumbs.data = {url: url, x: x, y: y};
}, 120);
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _stylesheet(route: str) -> ImportedStyleSheet:
    return ImportedStyleSheet(url=f"/{route}/static/css/app.css")


def _rgba(palette: list[str], alphas: np.ndarray) -> list[str]:
    """Palette colours with their alpha as ``#rrggbbaa`` (no per-row alpha column)."""
    return [f"{c}{int(round(float(a) * 255)):02x}" for c, a in zip(palette, alphas)] or ["#000000"]


class AppView:
    """The widgets of one session and their wiring to ``state``."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        #: how often a person's selection reached the state (tests count it)
        self.selection_callbacks = 0
        self.grid_page = 0
        self._syncing = False
        st = state
        css = [_stylesheet(st.route)]
        self.plot_rows = self._drawn_rows()
        self.thumb_prefix = thumb_url_prefix(st.route)

        # ---------------------------------------------------------------- plot
        codes, palette, alphas, _ = st.color_codes()
        # only what the plot and its hover need; colours (with alpha) as int codes through a mapper
        self.color_mapper = LinearColorMapper(
            palette=_rgba(palette, alphas), low=-0.5, high=max(len(palette), 1) - 0.5, name="color_mapper"
        )
        self.hover_labels = CustomJSHover(
            args={"labels": self._label_texts()}, code="return labels[value] ?? ('group #' + value)"
        )
        self.hover_thumb = CustomJSHover(args={"prefix": self.thumb_prefix}, code="return prefix + value")
        self.source = ColumnDataSource(data=self._points_data(), name="points")
        self.plot = figure(
            name="plot",
            width=PLOT_WIDTH,
            height=PLOT_HEIGHT,
            output_backend="webgl",
            tools="pan,box_zoom,wheel_zoom,save,reset",
            active_scroll="wheel_zoom",
            title=None,
            toolbar_location="above",
        )
        self.plot.xaxis.visible = False
        self.plot.yaxis.visible = False
        self.plot.grid.visible = False
        self.renderer = self.plot.scatter(
            "x",
            "y",
            source=self.source,
            size=st.point_size,
            fill_color={"field": "code", "transform": self.color_mapper},
            line_color=None,
            fill_alpha=1.0,
            selection_fill_alpha=1.0,
            selection_line_color="black",
            selection_line_alpha=0.6,
            nonselection_fill_alpha=0.15,
            name="scatter",
        )
        lasso = LassoSelectTool(continuous=False, renderers=[self.renderer], name="lasso")
        box = BoxSelectTool(continuous=False, renderers=[self.renderer], name="box_select")
        hover = HoverTool(
            tooltips=_TOOLTIP if "name" in self.source.data else _TOOLTIP_NO_NAME,
            formatters={"@code": self.hover_labels, "@row": self.hover_thumb},
            renderers=[self.renderer], name="hover",
        )  # fmt: skip
        tap = TapTool(renderers=[self.renderer], name="tap")
        self.plot.add_tools(lasso, box, hover, tap)
        self.plot.toolbar.active_drag = lasso
        # big maps: one server-rendered image, select tools resolved on the server
        self.image_map = ImageMap(self)
        self.image_map.wire(lasso, box, tap)
        for rng in (self.plot.x_range, self.plot.y_range):  # fit the data, not the image or thumbnails
            rng.renderers = [self.image_map.bounds]
        self.image_map.set_data(self.image_mode)
        # zoomed in far enough, the thumbnails themselves at their positions
        self.thumbs_source = ColumnDataSource(data={"url": [], "x": [], "y": []}, name="thumbs_source")
        self.thumbs = self.plot.add_glyph(
            self.thumbs_source,
            ImageURL(url="url", x="x", y="y", w=THUMB_PX, h=THUMB_PX, w_units="screen",
                     h_units="screen", anchor="center"),
            name="thumbs",
        )  # fmt: skip
        in_view = CustomJS(
            args={"points": self.source, "thumbs": self.thumbs_source, "xr": self.plot.x_range,
                  "yr": self.plot.y_range, "prefix": self.thumb_prefix, "limit": THUMBS_IN_VIEW,
                  "image": self.image_map.renderer},
            code=_THUMBS_JS,
        )  # fmt: skip
        for rng in (self.plot.x_range, self.plot.y_range):
            rng.js_on_change("start", in_view)
            rng.js_on_change("end", in_view)

        # ---------------------------------------------------------------- sidebar
        self.title = Div(name="title", text=self._title_html(), stylesheets=css)
        self.status = Div(name="status", text="", stylesheets=css, width=PLOT_WIDTH + SIDEBAR_WIDTH)
        self.color_by = Select(
            name="color_by",
            title="Colour by (and filter on)",
            value=st.label_column,
            options=st.label_columns(),
            width=SIDEBAR_WIDTH,
        )
        self.legend = Div(name="legend", text="", stylesheets=css, width=SIDEBAR_WIDTH)
        self.labels = MultiSelect(
            name="labels",
            title="Labels (selects their images)",
            options=st.label_options(),
            value=[],
            size=10,
            width=SIDEBAR_WIDTH,
        )
        self.only_selected = Checkbox(name="only_selected", label="Only change selected", active=False)
        self.clear = Button(name="clear_labels", label="Clear label MultiSelect", width=SIDEBAR_WIDTH)
        self.point_size = Slider(
            name="point_size", title="Point size", start=1, end=20, step=1,
            value=st.point_size, width=SIDEBAR_WIDTH,
        )  # fmt: skip
        self.save_name = TextInput(name="save_name", title="Save as", value="selection", width=SIDEBAR_WIDTH)
        self.save_images = Toggle(name="save_images", label="Save images", active=False, width=140)
        self.save = Button(name="save", label="Save", button_type="success", width=140)
        self.reset = Button(name="reset", label="Reset Data", button_type="warning", width=SIDEBAR_WIDTH)
        self.downloads = ColumnDataSource(data={"url": [], "filename": [], "cookie_path": []}, name="downloads")
        self.downloads.js_on_change(
            "data", CustomJS(args={"source": self.downloads, "key": st.session_key}, code=_DOWNLOAD_JS)
        )

        # ---------------------------------------------------------------- selection views
        self.grid = Div(name="grid", text="", stylesheets=css, width=PLOT_WIDTH + SIDEBAR_WIDTH)
        self.grid_info = Div(name="grid_page", text="", stylesheets=css)
        self.grid_prev = Button(name="grid_prev", label="◀ Previous", width=110)
        self.grid_next = Button(name="grid_next", label="Next ▶", width=110)
        self.table_info = Div(name="table_info", text="", stylesheets=css)
        self.table_source, self.table = self._make_table()

        # ---------------------------------------------------------------- wiring
        self.source.selected.on_change("indices", self._on_select)
        self.labels.on_change("value", self._on_labels)
        self.only_selected.on_change("active", self._on_only_selected)
        self.color_by.on_change("value", self._on_color_by)
        self.point_size.on_change("value_throttled", self._on_point_size)
        self.clear.on_click(self._on_clear)
        self.save.on_click(self._on_save)
        self.reset.on_click(self._on_reset)
        # Reset Data also restores the map's initial zoom (like the toolbar's reset tool)
        self.reset.js_on_click(CustomJS(args={"plot": self.plot}, code="plot.reset.emit()"))
        self.grid_prev.on_click(lambda: self._page(-1))
        self.grid_next.on_click(lambda: self._page(+1))
        st.subscribe(self.render)

        explore = column(
            self.color_by,
            self.legend,
            self.labels,
            self.only_selected,
            self.clear,
            self.point_size,
            self.save_name,
            row(self.save_images, self.save),
            self.reset,
            name="sidebar",
            width=SIDEBAR_WIDTH,
        )
        self._build_curation(css)
        self.labelling = LabellingPanel(st, css, SIDEBAR_WIDTH)
        self.label_panel.children.append(self.labelling.panel)
        self.finder = Finder(self, css, SIDEBAR_WIDTH, PLOT_WIDTH + SIDEBAR_WIDTH)
        self.tabs = Tabs(
            name="tabs",
            tabs=[
                TabPanel(child=explore, title="Explore"),
                TabPanel(child=self.label_panel, title="Label"),
                TabPanel(child=self.overview_panel, title="Overview"),
                TabPanel(child=self.metadata_panel, title="Metadata"),
                TabPanel(child=self.finder.panel, title="Find"),
            ],
            width=SIDEBAR_WIDTH + 20,
        )
        self.tabs.on_change("active", self._on_tab)
        self.tabs.on_change("active", lambda a, o, n: self.tabs.tabs[n].child is self.finder.panel and self.finder.warm())
        self.layout = column(
            self.title,
            self.status,
            row(self.crumbs, self.back, self.top),
            row(self.plot, self.tabs),
            self.finder.results_div,
            row(self.grid_prev, self.grid_info, self.grid_next, self.select_neighbours),
            self.grid,
            self.table_info,
            self.table,
            name="explorer",
        )
        # the map's source was filled above: "map" is not rendered twice
        self.render(frozenset({"selection", "filter", "label_column", "message", "labels", "columns"}))

    # ------------------------------------------------------------------ building
    def lasso_renderers(self) -> list[Any]:
        """The renderers lasso and box select act on (the dots, never the thumbnails)."""
        tool = self.plot.select_one(LassoSelectTool)
        return list(tool.renderers) if tool is not None else []

    def _drawn_rows(self) -> np.ndarray:
        """Rows on the map (source position -> row): the project's shared ``rows`` when all are."""
        st = self.state
        if not st.drill and st.valid is st.project.valid and st.project.all_valid:
            return st.project.rows
        return np.flatnonzero(st.valid).astype(np.int64)

    def _all_drawn(self) -> bool:
        st = self.state
        return not st.drill and len(self.plot_rows) == st.n_rows

    def map_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 x, y and int32 colour code of the drawn rows (:attr:`plot_rows`); the
        project's own arrays when every row is drawn."""
        st = self.state
        pr = st.project
        r = self.plot_rows
        codes = st.color_codes()[0]
        if self._all_drawn():
            return pr.x32, pr.y32, codes
        x, y = st.xy()
        return x[r].astype(np.float32), y[r].astype(np.float32), codes[r]

    def _points_data(self) -> dict[str, Any]:
        """The map's columns: float32 x/y, int32 colour code and row (binary, sent once).

        With every row drawn (no drill-down, no missing coordinates) these are the
        project's own arrays: a session adds no copy of them. Above the image threshold
        (:mod:`explorer.app.mapimage`) the columns are empty: the map is an image."""
        st = self.state
        pr = st.project
        self.plot_rows = r = self._drawn_rows()
        #: the map is one server-rendered image (many points) rather than dots
        self.image_mode = len(r) > image_threshold()
        if self.image_mode:
            return {"x": np.zeros(0, np.float32), "y": np.zeros(0, np.float32),
                    "code": np.zeros(0, np.int32), "row": np.zeros(0, np.int32)}  # fmt: skip
        codes = st.color_codes()[0]
        if self._all_drawn():
            data = {"x": pr.x32, "y": pr.y32, "code": codes, "row": pr.rows}
        else:
            x, y = st.xy()
            data = {"x": x[r].astype(np.float32), "y": y[r].astype(np.float32), "code": codes[r],
                    "row": r.astype(np.int32)}  # fmt: skip
        if st.n_rows <= NAME_LIMIT:
            data["name"] = pr.file_names if self._all_drawn() else pr.file_names[r]
        return data

    def _codes(self) -> np.ndarray:
        codes = self.state.color_codes()[0]
        return codes if self._all_drawn() else codes[self.plot_rows]

    def _label_texts(self) -> list[str]:
        """Hover text per colour code (at most HOVER_LABEL_LIMIT)."""
        st = self.state
        return [f"{st.label_column}: {st.label_text(v)}" for v in st.color_codes()[3][:HOVER_LABEL_LIMIT]]

    def thumb(self, row: int) -> str:
        return self.thumb_prefix + str(int(row))

    def _title_html(self) -> str:
        st = self.state
        n_clusters = len([v for v in st.label_values() if v != "-1"]) if st.label_column == "cluster" else None
        parts = [f"<b>{_esc(st.route or 'explorer')}</b>", f"{st.n_rows:,} images"]
        if n_clusters is not None:
            parts.append(f"{n_clusters:,} clusters")
        if st.csv_path is not None:
            parts.append(f"<span class='ex-muted'>{_esc(st.csv_path)}</span>")
        return f"<div class='ex-title'>{' &middot; '.join(parts)}</div>"

    def _make_table(self) -> tuple[ColumnDataSource, DataTable]:
        cols = self._table_columns()
        source = ColumnDataSource(data=self._table_data(np.zeros(0, dtype=np.int64)), name="table_source")
        table = DataTable(
            name="table",
            source=source,
            columns=cols,
            width=PLOT_WIDTH + SIDEBAR_WIDTH,
            height=360,
            row_height=50,
            index_position=None,
            selectable=False,
        )
        return source, table

    def _table_columns(self) -> list[TableColumn]:
        """The DataTable's columns (every column of the table, joined metadata included).

        The columns share one editor and one formatter of each kind (fewer models for every
        new session to build and send)."""
        st = self.state
        editor = StringEditor()
        text = StringFormatter()
        real, whole = NumberFormatter(format="0.000"), NumberFormatter(format="0")
        cols = [
            TableColumn(
                field="_thumb",
                title="",
                width=60,
                sortable=False,
                formatter=HTMLTemplateFormatter(
                    template='<img src="<%- value %>" alt="" style="height:46px;max-width:56px">'
                ),
                editor=editor,
            ),
            TableColumn(field="_file", title="file name", width=180, formatter=text, editor=editor),
            TableColumn(field="_label", title="label", width=100, formatter=text, editor=editor),
        ]
        self._table_fields: list[tuple[str, str]] = []
        for i, name in enumerate(st.table.columns):
            if name == "label":
                continue
            field = f"c{i}"
            self._table_fields.append((field, name))
            dtype = st.table[name].dtype
            if pd.api.types.is_float_dtype(dtype):
                fmt: Any = real
            elif pd.api.types.is_integer_dtype(dtype):
                fmt = whole
            else:
                fmt = text
            cols.append(TableColumn(field=field, title=str(name), formatter=fmt, width=90, editor=editor))
        return cols

    def _table_data(self, rows: np.ndarray) -> dict[str, Any]:
        st = self.state
        rows = rows[:TABLE_LIMIT]
        sub = st.table.iloc[rows]
        data: dict[str, Any] = {
            "_thumb": [self.thumb(i) for i in rows.tolist()],
            "_file": st.project.names_of(rows),
            "_label": st.labels_of(rows),
        }
        for field, name in getattr(self, "_table_fields", []):
            col = sub[name]
            if pd.api.types.is_numeric_dtype(col.dtype):
                data[field] = col.to_numpy()
            else:
                data[field] = col.fillna("").astype(str).tolist()
        return data

    # ------------------------------------------------------------------ curation widgets
    def _build_curation(self, css: list[Any]) -> None:
        st = self.state
        W = SIDEBAR_WIDTH
        half = (W - 10) // 2
        # label tab
        self.label_input = TextInput(name="label_input", title="Label", placeholder="e.g. cat", width=W)
        self.apply_label = Button(name="apply_label", label="Apply to selection", button_type="primary", width=half)
        self.discard = Button(name="discard", label="Discard selection", button_type="danger", width=half)
        self.clear_label = Button(name="clear_label", label="Remove label of selection", width=W)
        self.undo = Button(name="undo", label="↶ Undo", width=half)
        self.redo = Button(name="redo", label="Redo ↷", width=half)
        self.label_pick = Select(name="label_pick", title="Label to rename / merge", options=[], width=W)
        self.rename_to = TextInput(name="rename_to", title="New name / merge into", width=W)
        self.rename = Button(name="rename", label="Rename", width=half)
        self.merge = Button(name="merge", label="Merge into", width=half)
        self.propose = Button(name="propose", label="Label similar (suggest)", width=W)
        self.suggest_source = ColumnDataSource(data=self._suggest_data(), name="suggest_source")
        self.suggest_table = DataTable(
            name="suggest_table", source=self.suggest_source, width=W, height=150, index_position=None,
            columns=[
                TableColumn(field="file", title="image", width=120),
                TableColumn(field="proposed_label", title="label", width=80),
                TableColumn(field="confidence", title="agree", width=50, formatter=NumberFormatter(format="0%")),
            ],
        )  # fmt: skip
        self.accept_all = Button(name="accept_all", label="Accept all", button_type="success", width=95)
        self.accept_sel = Button(name="accept_selected", label="Accept chosen", width=100)
        self.reject = Button(name="reject", label="Reject", width=85)
        self.recluster = Button(name="recluster", label="Re-cluster selection", width=W)
        self.labels_name = TextInput(name="labels_name", title="Save labels as", value="labels", width=W)
        self.imagefolder = Toggle(name="imagefolder", label="+ ImageFolder zip", active=True, width=half)
        self.save_labels = Button(name="save_labels", label="Save labels", button_type="success", width=half)
        self.label_panel = column(
            self.label_input, row(self.apply_label, self.discard), self.clear_label, row(self.undo, self.redo),
            self.label_pick, self.rename_to, row(self.rename, self.merge), self.propose, self.suggest_table,
            row(self.accept_all, self.accept_sel, self.reject), self.recluster, self.labels_name,
            row(self.imagefolder, self.save_labels), name="label_panel", width=W,
        )  # fmt: skip
        # drill-down breadcrumbs (above the map)
        self.crumbs = Div(name="breadcrumbs", text="", stylesheets=css, width=PLOT_WIDTH - 200)
        self.back = Button(name="back", label="◀ Back", width=90, visible=False)
        self.top = Button(name="top", label="Whole map", width=100, visible=False)
        # overview tab
        self.group_id = TextInput(name="group_id", title="Group id (e.g. root-3-14)", value="root", width=W - 70)
        self.group_go = Button(name="group_go", label="Go", width=60)
        self.group_up = Button(name="group_up", label="▲ Up", width=half)
        self.group_select = Button(name="group_select", label="Select on map", width=half)
        self.group_buttons = [Button(name=f"group_{i}", label="", width=W, visible=False) for i in range(16)]
        self.overview_div = Div(name="overview", text="", stylesheets=css, width=W)
        self.overview_panel = column(
            row(self.group_id, self.group_go), row(self.group_up, self.group_select), self.overview_div,
            *self.group_buttons, name="overview_panel", width=W,
        )  # fmt: skip
        # metadata tab
        self.meta_file = FileInput(name="meta_file", accept=".csv,.tsv,.json,.jsonl", width=W)
        self.meta_key = TextInput(name="meta_key", title="Key column (file names; empty = guess)", width=W)
        self.meta_join = Button(name="meta_join", label="Join metadata", button_type="primary", width=W)
        self.tag_column = Select(name="tag_column", title="Tag column", options=[], width=W)
        self.tag_value = Select(name="tag_value", title="Tag (images) - selects them", options=[], width=W)
        self.metadata_panel = column(
            Div(text="<div class='ex-muted'>CSV or JSON with one row per image file name</div>", stylesheets=css),
            self.meta_file, self.meta_key, self.meta_join, self.tag_column, self.tag_value,
            name="metadata_panel", width=W,
        )  # fmt: skip
        self.select_neighbours = Button(name="select_neighbours", label="Select these neighbours", width=W, visible=False)
        # wiring
        self.apply_label.on_click(lambda: st.apply_label(self.label_input.value or ""))
        self.discard.on_click(st.discard_selection)
        self.clear_label.on_click(st.clear_selection_labels)
        self.undo.on_click(st.undo_labels)
        self.redo.on_click(st.redo_labels)
        self.rename.on_click(lambda: st.rename_label(self.label_pick.value or "", self.rename_to.value or ""))
        self.merge.on_click(lambda: st.merge_labels(self.label_pick.value or "", self.rename_to.value or ""))
        self.propose.on_click(self._on_propose)
        self.accept_all.on_click(lambda: st.accept_suggestions(None))
        self.accept_sel.on_click(lambda: st.accept_suggestions(list(self.suggest_source.selected.indices)))
        self.reject.on_click(self._on_reject)
        self.recluster.on_click(self._on_recluster)
        self.back.on_click(lambda: st.drill_up())
        self.top.on_click(lambda: st.drill_up(0))
        self.save_labels.on_click(self._on_save_labels)
        self.group_go.on_click(lambda: st.open_group(self.group_id.value or "root"))
        self.group_up.on_click(self._on_group_up)
        self.group_select.on_click(lambda: st.select_group())
        for i, b in enumerate(self.group_buttons):
            b.on_click(lambda i=i: self._on_group(i))
        self.meta_join.on_click(self._on_meta_join)
        self.tag_column.on_change("value", lambda a, o, n: self._render_tags())
        self.tag_value.on_change("value", self._on_tag_value)
        self.select_neighbours.on_click(st.select_neighbours)
        self._overview_open = False
        self._busy = ""
        #: the session's Document (set by build_document); slow work runs in a thread when served
        self.doc: Any = None

    def _suggest_data(self) -> dict[str, Any]:
        # the most confident first; Accept all applies every one, shown or not
        sg = self.state.suggestions.head(SUGGEST_LIMIT)
        return {
            "file": [p[max(p.rfind("/"), 0) + (1 if "/" in p else 0):] for p in sg["file"].tolist()],
            "proposed_label": sg["proposed_label"].tolist(),
            "confidence": sg["confidence"].to_numpy(dtype=float),
        }

    def poll(self) -> None:
        """Periodic: pick up label changes other sessions (tabs) wrote to the journal."""
        self.state.sync_labels()

    @property
    def served(self) -> bool:
        return self.doc is not None and self.doc.session_context is not None

    def _background(
        self,
        what: str,
        compute: Callable[[], Any],
        finish: Callable[[Any], None],
        *,
        drop_if_moved: bool = True,
        pool: str = "threads",
        args: tuple = (),
    ) -> None:
        """Run ``compute(*args)`` in the process-wide pool when served (every session stays
        responsive; ``pool="processes"`` for numba-heavy work), then ``finish(result)`` on
        the document's next tick, unless the person moved on meanwhile and
        ``drop_if_moved``. Without a server (tests, scripts) both run right away."""
        if not self.served:
            try:
                result = compute(*args)
            except Exception as exc:
                result = exc
            self._finish(what, finish, result)
            return
        if self._busy:
            self.state._refuse(f"still working: {self._busy}")
            return
        from explorer.app import work

        self._busy = what
        gen = self.state.generation.value
        self.state._say(f"working: {what}... (the page stays usable)")
        self.status.text = self._status_html()
        doc = self.doc
        executor = work.processes() if pool == "processes" else work.threads()
        try:
            future = executor.submit(compute, *args)
        except RuntimeError as exc:  # pool shut down (server stopping)
            self._busy = ""
            self.state._refuse(f"{what} failed: {exc}")
            return

        def on_loop(result: Any) -> None:
            self._busy = ""
            if drop_if_moved and not self.state.generation.current(gen):
                self.state._say(f"{what}: result dropped (the selection changed meanwhile)")
                self.state._emit("message")
                return
            self._finish(what, finish, result)

        work.when_done(future, doc, on_loop)

    def _finish(self, what: str, finish: Callable[[Any], None], result: Any) -> None:
        if isinstance(result, Exception) and not isinstance(result, ValueError):
            self.state._refuse(f"{what} failed: {result}")
        else:
            finish(result)

    def _on_propose(self) -> None:
        st = self.state
        plan = st.propose_plan()
        if plan is None:
            return
        self._background("finding label suggestions", lambda: st.propose_compute(plan),
                         lambda df: st.propose_show(plan, df), drop_if_moved=False)

    def _on_recluster(self) -> None:
        from explorer.app.work import recluster_in_worker

        st = self.state
        plan = st.recluster_plan()
        if plan is None:
            return
        rows, parent = plan
        if self.served:  # numba + warnings filters: in the worker process, never a thread
            self._background(
                f"re-clustering {len(rows):,} images", recluster_in_worker,
                lambda rc: st.recluster_show(rows, parent, rc), pool="processes",
                args=(st.features(rows), parent, 42),
            )  # fmt: skip
        else:
            st.recluster_show(rows, parent, st.recluster_compute(rows, parent))

    def _on_tab(self, attr: str, old: Any, new: int) -> None:
        st = self.state
        if new == 2 and not self._overview_open:
            if st.tree is not None:
                self._overview_open = True
                st.open_group("root")
                return
            if not st.has_features:
                st.overview()  # says why there is no overview
                return
            self._overview_open = True

            def finish(tree: Any) -> None:
                if isinstance(tree, Exception):
                    self._overview_open = False  # try again next time (review L12)
                    st._refuse(f"no overview: {tree}")
                    return
                st.open_group("root")

            self._background("building the overview (once for every session)", st.overview_compute,
                             finish, drop_if_moved=False)

    def _on_group(self, i: int) -> None:
        groups = self.state.overview_groups()
        if i < len(groups):
            self.state.open_group(groups[i][0])

    def _on_group_up(self) -> None:
        gid = self.state.overview_id
        if gid != "root":
            self.state.open_group(gid.rsplit("-", 1)[0])

    def _on_reject(self) -> None:
        chosen = list(self.suggest_source.selected.indices)
        self.state.reject_suggestions(chosen or None)

    def _on_meta_join(self) -> None:
        import base64

        st = self.state
        if not self.meta_file.value:
            st._refuse("choose a CSV or JSON file first")
            return
        value = self.meta_file.value
        name = self.meta_file.filename
        value = value[0] if isinstance(value, list) else value
        name = name[0] if isinstance(name, list) else name
        try:
            data = base64.b64decode(value)
        except ValueError as exc:
            st._refuse(f"upload unreadable: {exc}")
            return
        key = self.meta_key.value or None
        self._background(f"joining {name or 'the upload'}", lambda: st.metadata_compute(data, name or "", key),
                         lambda found: st.metadata_show(found, name or ""), drop_if_moved=False)

    def _on_tag_value(self, attr: str, old: Any, new: str) -> None:
        if self._syncing or not new or not self.tag_column.value:
            return
        self._links = []
        self.state.select_tag(self.tag_column.value, new)

    def _save(self, what: str, make_plan: Callable[[], Any], imagefolder: bool = False) -> None:
        """Plan a save on the loop, write it in the pool, offer it to this session."""
        st = self.state
        self._links = []
        try:
            plan = make_plan()
        except ExportError as exc:
            st._refuse(f"not saved: {exc}")
            return

        def finish(result: Any) -> None:
            if isinstance(result, OSError):
                result = ExportError(f"saving failed: {result}")
            done = st.export_finish(result, imagefolder=imagefolder)
            if done is not None:
                self._offer_downloads(done)

        self._background(what, lambda: st.export_write(plan), finish, drop_if_moved=False)

    def _on_save(self) -> None:
        name = self.save_name.value or ""
        images = bool(self.save_images.active)
        self._save(f"saving {name}" + (" with images" if images else ""), lambda: self.state.export_plan(name, images))

    def _on_save_labels(self) -> None:
        name = self.labels_name.value or ""
        folder = bool(self.imagefolder.active)
        self._save(f"saving labels to {name}", lambda: self.state.labels_plan(name, folder), imagefolder=folder)

    def _offer_downloads(self, result: Any) -> None:
        """Show links to saved files and hand them to the browser as downloads."""
        self._links = list(result.downloads)
        self.status.text = self._status_html()
        self.downloads.data = {
            "url": [u for _, u in result.downloads],
            "filename": [n for n, _ in result.downloads],
            "cookie_path": list(result.cookie_paths),
        }

    def _render_tags(self) -> None:
        st = self.state
        col = self.tag_column.value
        if not (col and col in st.table.columns):
            self.tag_value.options = []
            return

        def show(counts: Any) -> None:
            if isinstance(counts, Exception) or self.tag_column.value != col:
                return
            self.tag_value.options = [("", "")] + [(v, f"{v} ({c:,})") for v, c in list(counts.items())[:500]]

        if self.served and not self._busy:
            self._background(f"counting tags of {col}", lambda: st.tag_counts(col), show, drop_if_moved=False)
        elif not self.served:
            show(st.tag_counts(col))

    def _render_curation(self, what: frozenset[str]) -> None:
        st = self.state
        if "labels" in what:
            names = st.label_names()
            self.label_pick.options = names
            if self.label_pick.value not in names:
                self.label_pick.value = names[0] if names else ""
            can = st.book is not None
            self.undo.disabled = not (can and st.book.can_undo)
            self.redo.disabled = not (can and st.book.can_redo)
        if "suggestions" in what:
            self.suggest_source.selected.indices = []
            self.suggest_source.data = self._suggest_data()
            none = len(st.suggestions) == 0
            self.accept_all.disabled = self.accept_sel.disabled = self.reject.disabled = none
        if "columns" in what:
            if [f for f, _ in self._table_fields] != [f"c{i}" for i, c in enumerate(st.table.columns) if c != "label"]:
                self.table.columns = self._table_columns()
                self.table_source.data = self._table_data(st.selection)
            self.color_by.options = st.label_columns()
            tags = st.tag_columns()
            self.tag_column.options = [""] + tags
            if self.tag_column.value not in tags:
                self.tag_column.value = tags[0] if tags else ""
            self._render_tags()
            crumbs = st.breadcrumbs()
            self.crumbs.text = (
                "<div class='ex-crumbs'>" + " &rsaquo; ".join(_esc(c) for c in crumbs) + "</div>"
                if len(crumbs) > 1 else ""
            )
            self.back.visible = self.top.visible = len(crumbs) > 1
        if "overview" in what:
            self._render_overview()
        off = not st.has_features
        self.propose.disabled = self.recluster.disabled = off

    def _render_overview(self) -> None:
        st = self.state
        groups = st.overview_groups() if st.tree is not None else []
        self.group_id.value = st.overview_id
        cells = []
        for gid, count, reps in groups:
            imgs = "".join(f"<img src='{_esc(self.thumb(r))}' alt=''>" for r in reps[:4])
            cells.append(f"<div class='ex-group'><div class='ex-group-imgs'>{imgs}</div>"
                         f"<div><b>{_esc(gid)}</b> &middot; {count:,} images</div></div>")
        self.overview_div.text = "".join(cells)
        node = st.tree.node(st.overview_id) if st.tree is not None else None
        for i, b in enumerate(self.group_buttons):
            if node is not None and node.children and i < len(groups):
                b.label = f"open {groups[i][0]} ({groups[i][1]:,})"
                b.visible = True
            else:
                b.visible = False
        self.group_up.disabled = st.overview_id == "root"

    # ------------------------------------------------------------------ rendering
    def render(self, what: frozenset[str]) -> None:
        """Bring the widgets in line with the state (``what``: aspects that changed)."""
        st = self.state
        self._syncing = True
        redraw = "map" in what or "point_size" in what  # the image map (big maps)
        try:
            if "map" in what:
                self.source.data = self._points_data()
                self.image_map.set_data(self.image_mode)
            if ("label_column" in what or ("labels" in what and st.label_column == "label")) and "map" not in what:
                if self.image_mode:
                    self.image_map.set_codes()
                    redraw = True
                else:
                    # only the code column (binary) is re-sent, never the whole source
                    self.source.data.update(code=self._codes())
            if "label_column" in what or "map" in what or ("labels" in what and st.label_column == "label"):
                _, palette, alphas, _ = st.color_codes()
                self.color_mapper.update(
                    palette=_rgba(palette, alphas), low=-0.5, high=max(len(palette), 1) - 0.5
                )
                self.hover_labels.args = {"labels": self._label_texts(), "column": st.label_column}
                self.labels.options = self.finder.label_options()
                self.color_by.value = st.label_column
                self.legend.text = self._legend_html()
                self.title.text = self._title_html()
            if "selection" in what and self.image_mode:
                self.image_map.set_selection()
                redraw = True
                if len(self.source.selected.indices):
                    self.source.selected.indices = []
            elif "selection" in what:
                # an int32 array: bokeh validates it at once (a list is checked item by item)
                want = np.searchsorted(self.plot_rows, st.selection).astype(np.int32)
                have = self.source.selected.indices
                if len(have) != len(want) or not np.array_equal(np.asarray(have), want):
                    self.source.selected.indices = want
            if "selection" in what:
                self.grid_page = 0
                self._render_selection()
            if "filter" in what and list(self.labels.value) != list(st.label_filter):
                self.labels.value = list(st.label_filter)
            if "only_selected" in what and self.only_selected.active != st.only_selected:
                self.only_selected.active = st.only_selected
            if "point_size" in what:
                self.renderer.glyph.size = st.point_size
                if self.point_size.value != st.point_size:
                    self.point_size.value = st.point_size
            if "labels" in what and "selection" not in what:
                self.table_source.data = self._table_data(st.selection)
                self._render_grid()
            if "neighbours" in what and "selection" not in what:
                self._render_grid()
            self._render_curation(what)
            if "message" in what:
                self.status.text = self._status_html()
            if redraw and self.image_mode:
                self.image_map.request()
        finally:
            self._syncing = False

    def _render_selection(self) -> None:
        st = self.state
        sel = st.selection
        self.table_source.data = self._table_data(sel)
        if len(sel) > TABLE_LIMIT:
            self.table_info.text = (
                f"<div class='ex-muted'>table shows the first {TABLE_LIMIT:,} of {len(sel):,} "
                "selected rows; Save writes all of them</div>"
            )
        else:
            self.table_info.text = f"<div class='ex-muted'>{len(sel):,} selected row(s)</div>"
        self._render_grid()

    def _render_grid(self) -> None:
        nb = self.state.neighbours
        self.select_neighbours.visible = nb is not None
        if nb is not None:
            self._render_neighbours(*nb)
            return
        sel = self.state.selection
        pages = max(1, -(-len(sel) // GRID_PAGE))
        self.grid_page = min(max(self.grid_page, 0), pages - 1)
        start = self.grid_page * GRID_PAGE
        rows = sel[start : start + GRID_PAGE]
        labels = self.state.labels()
        cells = []
        for i in rows:
            name, label = _esc(self.state.project.names_of([i])[0]), _esc(self.state.label_text(labels[i]))
            cells.append(
                f"<figure class='ex-cell'><img src='{_esc(self.thumb(i))}' alt='' "
                f"loading='lazy' title='{name}'><figcaption><span class='ex-name'>{name}</span>"
                f"<span class='ex-label'>{label}</span></figcaption></figure>"
            )
        if cells:
            self.grid.text = f"<div class='ex-grid'>{''.join(cells)}</div>"
        else:
            self.grid.text = "<div class='ex-muted'>Select images on the map (lasso or box) to see them here.</div>"
        if len(sel):
            self.grid_info.text = (
                f"<div class='ex-pageinfo'>images {start + 1:,}-{start + len(rows):,} of {len(sel):,} "
                f"(page {self.grid_page + 1} of {pages})</div>"
            )
        else:
            self.grid_info.text = "<div class='ex-pageinfo'>no images selected</div>"
        self.grid_prev.disabled = self.grid_page <= 0
        self.grid_next.disabled = self.grid_page >= pages - 1

    def _render_neighbours(self, row: int, idx: np.ndarray, dist: np.ndarray) -> None:
        labels = self.state.labels()
        cells = []
        for i, d in [(row, None)] + list(zip(idx.tolist(), dist.tolist())):
            name, label = _esc(self.state.project.names_of([i])[0]), _esc(self.state.label_text(labels[i]))
            extra = "<span class='ex-dist'>this image</span>" if d is None else f"<span class='ex-dist'>distance {d:.3f}</span>"
            cells.append(
                f"<figure class='ex-cell{' ex-query' if d is None else ''}'><img src='{_esc(self.thumb(i))}' alt='' "
                f"loading='lazy' title='{name}'><figcaption><span class='ex-name'>{name}</span>"
                f"<span class='ex-label'>{label}</span>{extra}</figcaption></figure>"
            )
        self.grid.text = f"<div class='ex-grid ex-neighbours'>{''.join(cells)}</div>"
        self.grid_info.text = f"<div class='ex-pageinfo'>{len(idx)} nearest neighbours of {_esc(self.state.project.names_of([row])[0])}</div>"
        self.grid_prev.disabled = self.grid_next.disabled = True

    def _legend_html(self) -> str:
        items = self.state.legend()
        shown = items[:300]
        rows = "".join(
            f"<div class='ex-legend-item'><span class='ex-swatch' style='background:{c}'></span>"
            f"<span class='ex-legend-text'>{_esc(self.finder.group_text(v, t))}</span><span class='ex-count'>{n:,}</span></div>"
            for v, t, c, n in shown
        )
        more = f"<div class='ex-muted'>... and {len(items) - len(shown):,} more</div>" if len(items) > len(shown) else ""
        return f"<div class='ex-legend'>{rows}{more}</div>"

    def _status_html(self) -> str:
        st = self.state
        out = []
        for p in st.problems:
            out.append(f"<div class='ex-msg ex-warning'>&#9888; {_esc(p)}</div>")
        level, text = st.message
        if text:
            out.append(f"<div class='ex-msg ex-{_esc(level)}'>{_esc(text)}</div>")
        links = getattr(self, "_links", [])
        if links and level != "error":
            out.append(
                "<div class='ex-msg'>download: "
                + ", ".join(f"<a href='{_esc(u)}' download='{_esc(n)}'>{_esc(n)}</a>" for n, u in links)
                + "</div>"
            )
        return "".join(out)

    # ------------------------------------------------------------------ callbacks
    def _on_select(self, attr: str, old: Any, new: Sequence[int]) -> None:
        if self._syncing:
            return
        idx = np.asarray(new, dtype=np.int64)
        idx = idx[(idx >= 0) & (idx < len(self.plot_rows))]
        self.state_select(self.plot_rows[idx])

    def state_select(self, rows: np.ndarray, mode: str = "replace") -> None:
        """A person selected ``rows`` on the map (dots: Bokeh's indices; image: the server's
        lasso); ``mode`` combines them with the selection as the select tools do
        ("replace", "append", "intersect", "subtract", or "toggle" for a Shift-click)."""
        st = self.state
        rows = np.asarray(rows, dtype=np.int64)
        combine = {"replace": lambda a, b: b, "append": np.union1d, "intersect": np.intersect1d,
                   "subtract": np.setdiff1d, "toggle": np.setxor1d}  # fmt: skip
        if mode not in combine:
            raise ValueError(f"mode must be one of {sorted(combine)}, got {mode!r}")
        rows = combine[mode](st.selection, rows)
        self.selection_callbacks += 1
        self._links = []
        st.defer_neighbours = self.served
        st.select(rows)
        if self.served and len(st.selection) == 1 and st.has_features:
            row = int(st.selection[0])
            self._background_quiet(lambda: st.neighbours_compute(row), st.neighbours_show)

    def _background_quiet(self, compute: Callable[[], Any], finish: Callable[[Any], None]) -> None:
        """A short search in the pool (no busy message); the result is dropped if stale."""
        from explorer.app import work

        gen = self.state.generation.value

        def on_loop(result: Any) -> None:
            if self.state.generation.current(gen):
                finish(result)

        work.when_done(work.threads().submit(compute), self.doc, on_loop)

    def _on_labels(self, attr: str, old: Any, new: Sequence[str]) -> None:
        if self._syncing:
            return
        self._links = []
        self.state.set_label_filter(new)

    def _on_only_selected(self, attr: str, old: Any, new: bool) -> None:
        if self._syncing:
            return
        self.state.set_only_selected(new)

    def _on_color_by(self, attr: str, old: Any, new: str) -> None:
        if self._syncing:
            return
        self.state.set_label_column(new)

    def _on_point_size(self, attr: str, old: Any, new: float) -> None:
        if self._syncing or new is None:
            return
        self.state.set_point_size(new)

    def _on_clear(self) -> None:
        self._links = []
        self.state.clear_label_filter()

    def _on_reset(self) -> None:
        self._links = []
        self.state.reset()

    def _page(self, step: int) -> None:
        self.grid_page += step
        self._render_grid()


# --------------------------------------------------------------------------- document
def error_page(doc: Any, route: str, title: str, message: str) -> None:
    css = [_stylesheet(route)]
    doc.add_root(
        column(
            Div(name="title", text=f"<div class='ex-title'><b>{_esc(title)}</b></div>", stylesheets=css),
            Div(
                name="status",
                text=f"<div class='ex-msg ex-error'>&#9888; {_esc(message)}</div>",
                stylesheets=css,
                width=900,
            ),
            name="explorer",
        )
    )


def build_document(doc: Any, app_dir: str | os.PathLike, argv: Sequence[str] = ()) -> AppView | None:
    """Fill ``doc`` with the explorer for the CSV named by ``argv`` (see ``find_csv``).

    Any exception while loading shows the error page instead of a blank one (review H5)."""
    import logging

    from explorer.app import find_csv

    app_dir = Path(app_dir).resolve()
    route = app_dir.name
    doc.title = f"{route} - bulk image explorer"
    prefix = os.environ.get("EXPLORER_APP_PREFIX", "").strip("/")  # `explorer serve` (bokeh --prefix)
    if prefix:
        route = f"{prefix}/{route}"
    doc.template_variables["app_route"] = f"/{route}"
    try:
        csv = find_csv(argv, app_dir)
        state = AppState.from_csv(csv, app_dir=app_dir, route=route)
        view = AppView(state)
    except Exception as exc:  # noqa: BLE001 - the person sees why, the log has the trace
        logging.getLogger("bokeh.server.explorer").exception("cannot show %s", route)
        error_page(doc, route, f"{route}: cannot show the images", f"{exc}" or type(exc).__name__)
        return None
    view.doc = doc
    doc.add_root(view.layout)
    if state.book is not None and state.book.journal is not None:
        doc.add_periodic_callback(view.poll, 1000)
    doc.add_root(view.downloads)  # not in the layout; a root so it reaches the browser
    doc.explorer_view = view  # lets tests reach the session's view and state
    if doc.session_context is not None:
        from explorer.app.downloads import store

        key = state.session_key
        # the session's exports are deleted when it ends
        doc.on_session_destroyed(lambda ctx, key=key: store().drop_owner(key))
    return view
