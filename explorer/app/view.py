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
    InlineStyleSheet,
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
from explorer.app.duplicates import DuplicatesPanel
from explorer.app.finder import Finder
from explorer.app import html as H
from explorer.app.html import DOWNLOAD_JS, THUMBS_JS, TOOLTIP, TOOLTIP_NO_NAME, column_title
from explorer.app.label_panel import LabelPanel
from explorer.app.labelling import LabellingPanel
from explorer.app.mapimage import THUMBS_IN_VIEW, ImageMap, MapPort
from explorer.app.metadata_panel import MetadataPanel
from explorer.app.overview_panel import OverviewPanel
from explorer.app.treemap import TreemapPanel
from explorer.app.project import thumb_url_prefix
from explorer.app.state import AppState, ExportError

#: the DataTable shows at most this many selected rows (Save writes all of them)
TABLE_LIMIT = 2000
#: thumbnails per page of the selection grid
GRID_PAGE = 40
#: the map's smallest size (it stretches to the room the window gives it)
MAP_MIN_WIDTH, MAP_MIN_HEIGHT = 520, 360
#: the image grid's and table's smallest width beside the map (narrower windows: below it)
IMAGES_MIN_WIDTH = 360
TABLE_HEIGHT = 300
SIDEBAR_WIDTH = 300
#: file names go into the map's source (for the hover) only up to this many points
NAME_LIMIT = 200_000
#: the hover names at most this many groups of the colour column (then "group #code")
HOVER_LABEL_LIMIT = 20_000
#: their size on screen (pixels)
THUMB_PX = 44


#: the tab headers wrap onto a second row instead of scrolling out of the sidebar (seven tabs
#: are wider than it)
TAB_HEADERS_WRAP = ":host(.bk-above) .bk-headers-wrapper { flex-wrap: wrap; overflow-x: visible; }"


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
        #: (file name, URL) of the last save's files, shown as links until the person moves on
        self._links: list[tuple[str, str]] = []
        st = state
        #: the app's stylesheet, for every Div (panels use it too)
        self.css = css = [_stylesheet(st.route)]
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
            sizing_mode="stretch_both",
            min_width=MAP_MIN_WIDTH,
            min_height=MAP_MIN_HEIGHT,
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
            tooltips=TOOLTIP if "name" in self.source.data else TOOLTIP_NO_NAME,
            formatters={"@code": self.hover_labels, "@row": self.hover_thumb},
            renderers=[self.renderer], name="hover",
        )  # fmt: skip
        tap = TapTool(renderers=[self.renderer], name="tap")
        self.plot.add_tools(lasso, box, hover, tap)
        self.plot.toolbar.active_drag = lasso
        # big maps: one server-rendered image, select tools resolved on the server
        self.image_map = ImageMap(MapPort(
            plot=self.plot, dots=self.renderer, state=st, drawn_rows=lambda: self.plot_rows,
            columns=self.map_columns, select=self.state_select, show_thumbs=self._show_thumbs,
            document=lambda: self.doc if self.served else None,
        ))  # fmt: skip
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
            code=THUMBS_JS,
        )  # fmt: skip
        for rng in (self.plot.x_range, self.plot.y_range):
            rng.js_on_change("start", in_view)
            rng.js_on_change("end", in_view)

        # ---------------------------------------------------------------- sidebar
        self.title = Div(name="title", text=self._title_html(), stylesheets=css)
        self.status = Div(name="status", text="", stylesheets=css, sizing_mode="stretch_width")
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
            "data", CustomJS(args={"source": self.downloads, "key": st.session_key}, code=DOWNLOAD_JS)
        )

        # ---------------------------------------------------------------- selection views
        self.grid = Div(name="grid", text="", stylesheets=css, sizing_mode="stretch_both")
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
        self._build_drill(css)
        self.finder = Finder(self, css, SIDEBAR_WIDTH, None)
        self.panels = self._build_panels()
        self.tabs = Tabs(
            name="tabs",
            tabs=[TabPanel(child=explore, title="Explore")]
            + [TabPanel(child=p.panel, title=p.title) for p in self.panels],
            width=SIDEBAR_WIDTH + 20,
            sizing_mode="stretch_height",
            styles={"overflow-y": "auto", "flex": "none"},
            stylesheets=[InlineStyleSheet(css=TAB_HEADERS_WRAP)],
        )
        self.tabs.on_change("active", self._on_tab)
        self.layout = self._build_layout()
        # the map's source was filled above: "map" is not rendered twice
        self.render(frozenset({"selection", "filter", "label_column", "message", "labels", "columns"}))

    # ------------------------------------------------------------------ building
    def _build_panels(self) -> list[Any]:
        """The sidebar's panels after Explore, in tab order (see :mod:`explorer.app.panel`).

        Add a panel here: ``Module.Panel(self, SIDEBAR_WIDTH)``, one line each."""
        self.label_panel = LabelPanel(self, SIDEBAR_WIDTH)
        # label a few, the tool labels the rest (explorer.app.labelling), in the Label tab
        self.labelling = LabellingPanel(self.state, self.css, SIDEBAR_WIDTH, background=self.background)
        self.label_panel.panel.children.append(self.labelling.panel)
        self.overview_panel = OverviewPanel(self, SIDEBAR_WIDTH)
        self.metadata_panel = MetadataPanel(self, SIDEBAR_WIDTH)
        self.treemap = TreemapPanel(self.state, self.thumb, self.background, width=SIDEBAR_WIDTH,
                                    height=460, stylesheets=self.css)
        self.duplicates = DuplicatesPanel(self, self.css, SIDEBAR_WIDTH, 700)
        return [
            self.label_panel,
            self.overview_panel,
            self.metadata_panel,
            self.finder,
            self.treemap,
            self.duplicates,
            # add a panel here
        ]

    def _on_tab(self, attr: str, old: Any, new: int) -> None:
        """A tab was opened: tell its panel (``opened()``, if it has one)."""
        child = self.tabs.tabs[new].child if 0 <= new < len(self.tabs.tabs) else None
        for panel in self.panels:
            if panel.panel is child and hasattr(panel, "opened"):
                panel.opened()
            elif panel.panel is not child and hasattr(panel, "closed"):
                panel.closed()

    def _build_layout(self) -> Any:
        """The page: a header, then the map (it takes the room the window gives it) with the
        image grid and the table beside it, wrapping below it on narrow windows, and the
        sidebar's tabs at the right, always in view (the page itself does not scroll)."""
        self.crumbs_row = row(self.crumbs, self.back, self.top, name="crumbs_row", visible=False)
        header = column(self.title, self.status, self.crumbs_row, name="header", sizing_mode="stretch_width")
        map_box = column(self.plot, name="map_box", sizing_mode="stretch_both",
                         styles={"flex": "2 1 0px", "min-width": f"{MAP_MIN_WIDTH}px",
                                 "min-height": f"{MAP_MIN_HEIGHT}px"})  # fmt: skip
        # the grid scrolls inside its own box; the table keeps its place under it
        self.grid.styles = {"overflow-y": "auto", "min-height": "160px"}
        nav = row(self.grid_prev, self.grid_info, self.grid_next, self.select_neighbours, name="grid_nav",
                  sizing_mode="stretch_width", styles={"flex-wrap": "wrap"})
        images = column(
            self.finder.results_div, self.duplicates.cards, nav, self.grid, self.table_info, self.table,
            name="images_box", sizing_mode="stretch_both",
            styles={"flex": "1 1 0px", "min-width": f"{IMAGES_MIN_WIDTH}px", "min-height": "560px",
                    "overflow-y": "auto"},
        )  # fmt: skip
        workspace = row(map_box, images, name="workspace", sizing_mode="stretch_both",
                        styles={"flex-wrap": "wrap", "overflow-y": "auto"})
        body = row(workspace, self.tabs, name="body", sizing_mode="stretch_both")
        return column(header, body, name="explorer", sizing_mode="stretch_both")

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
        r = self.plot_rows
        codes = st.color_codes()[0]
        if self._all_drawn():
            return *st.xy32(), codes
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
            x32, y32 = st.xy32()
            data = {"x": x32, "y": y32, "code": codes, "row": pr.rows}
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

    def _show_thumbs(self, rows: np.ndarray | None) -> None:
        """Draw ``rows``' thumbnails on the map at their positions (``None``: none)."""
        if rows is not None:
            x, y = self.state.xy()
            self.thumbs_source.data = {
                "url": [self.thumb(r) for r in rows.tolist()],
                "x": x[rows].tolist(), "y": y[rows].tolist(),
            }  # fmt: skip
        elif len(self.thumbs_source.data["url"]):
            self.thumbs_source.data = {"url": [], "x": [], "y": []}

    def _title_html(self) -> str:
        st = self.state
        n_clusters = len([v for v in st.label_values() if v != "-1"]) if st.label_column == "cluster" else None
        return H.title(st.route or "explorer", st.n_rows, n_clusters, st.csv_path)

    def _make_table(self) -> tuple[ColumnDataSource, DataTable]:
        cols = self._table_columns()
        source = ColumnDataSource(data=self._table_data(np.zeros(0, dtype=np.int64)), name="table_source")
        table = DataTable(
            name="table",
            source=source,
            columns=cols,
            sizing_mode="stretch_width",
            height=TABLE_HEIGHT,
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
            cols.append(TableColumn(field=field, title=column_title(name), formatter=fmt, width=90, editor=editor))
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
    def _build_drill(self, css: list[Any]) -> None:
        """The drill-down's breadcrumbs (above the map) and the neighbours' button."""
        st = self.state
        self.crumbs = Div(name="breadcrumbs", text="", stylesheets=css, width=560)
        self.back = Button(name="back", label="◀ Back", width=90, visible=False)
        self.top = Button(name="top", label="Whole map", width=100, visible=False)
        self.select_neighbours = Button(name="select_neighbours", label="Select these neighbours",
                                        width=SIDEBAR_WIDTH, visible=False)  # fmt: skip
        self.back.on_click(lambda: st.drill_up())
        self.top.on_click(lambda: st.drill_up(0))
        self.select_neighbours.on_click(st.select_neighbours)
        self.busy = ""
        self._doc: Any = None

    def poll(self) -> None:
        """Periodic: pick up label changes other sessions (tabs) wrote to the journal."""
        self.state.sync_labels()

    @property
    def doc(self) -> Any:
        """The session's Document (set by build_document); slow work runs in a thread when served."""
        return self._doc

    @doc.setter
    def doc(self, doc: Any) -> None:
        self._doc = doc
        # the served app finds a clicked image's neighbours in the background
        self.state.defer_neighbours = self.served

    @property
    def served(self) -> bool:
        return self.doc is not None and self.doc.session_context is not None

    @property
    def syncing(self) -> bool:
        """True while :meth:`render` brings the widgets in line with the state."""
        return self._syncing

    def background(
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
        if self.busy:
            self.state.refuse(f"still working: {self.busy}")
            return
        from explorer.app import work

        self.busy = what
        gen = self.state.generation.value
        self.state.say(f"working: {what}... (the page stays usable)")
        self.status.text = self._status_html()
        doc = self.doc
        executor = work.processes() if pool == "processes" else work.threads()
        try:
            future = executor.submit(compute, *args)
        except RuntimeError as exc:  # pool shut down (server stopping)
            self.busy = ""
            self.state.refuse(f"{what} failed: {exc}")
            return

        def on_loop(result: Any) -> None:
            self.busy = ""
            if drop_if_moved and not self.state.generation.current(gen):
                self.state.say(f"{what}: result dropped (the selection changed meanwhile)")
                self.state.emit("message")
                return
            self._finish(what, finish, result)

        work.when_done(future, doc, on_loop)

    def _finish(self, what: str, finish: Callable[[Any], None], result: Any) -> None:
        if isinstance(result, Exception) and not isinstance(result, ValueError):
            self.state.refuse(f"{what} failed: {result}")
        else:
            finish(result)

    # the names of branches written before these were public (kept for merging them)
    _background = background

    def save_export(self, what: str, make_plan: Callable[[], Any], imagefolder: bool = False) -> None:
        """Plan a save on the loop, write it in the pool, offer it to this session."""
        st = self.state
        self._links = []
        try:
            plan = make_plan()
        except ExportError as exc:
            st.refuse(f"not saved: {exc}")
            return

        def finish(result: Any) -> None:
            if isinstance(result, OSError):
                result = ExportError(f"saving failed: {result}")
            done = st.export_finish(result, imagefolder=imagefolder)
            if done is not None:
                self._offer_downloads(done)

        self.background(what, lambda: st.export_write(plan), finish, drop_if_moved=False)

    def _on_save(self) -> None:
        name = self.save_name.value or ""
        images = bool(self.save_images.active)
        self.save_export(f"saving {name}" + (" with images" if images else ""), lambda: self.state.export_plan(name, images))

    def _offer_downloads(self, result: Any) -> None:
        """Show links to saved files and hand them to the browser as downloads."""
        self._links = list(result.downloads)
        self.status.text = self._status_html()
        self.downloads.data = {
            "url": [u for _, u in result.downloads],
            "filename": [n for n, _ in result.downloads],
            "cookie_path": list(result.cookie_paths),
        }

    def _render_columns(self) -> None:
        """The table's columns changed (a metadata join) or the map's rows (drill-down)."""
        st = self.state
        if [f for f, _ in self._table_fields] != [f"c{i}" for i, c in enumerate(st.table.columns) if c != "label"]:
            self.table.columns = self._table_columns()
            self.table_source.data = self._table_data(st.selection)
        self.color_by.options = st.label_columns()
        crumbs = st.breadcrumbs()
        self.crumbs.text = H.crumbs(crumbs)
        self.back.visible = self.top.visible = self.crumbs_row.visible = len(crumbs) > 1

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
            if "columns" in what:
                self._render_columns()
            for panel in self.panels:
                if panel is not self.finder:  # the finder subscribes itself
                    panel.render(what)
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
            self.table_info.text = H.muted(
                f"table shows the first {TABLE_LIMIT:,} of {len(sel):,} selected rows; Save writes all of them")
        else:
            self.table_info.text = H.muted(f"{len(sel):,} selected row(s)")
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
        names = self.state.project.names_of(rows)
        cells = [H.image_cell(self.thumb(i), name, self.state.label_text(labels[i])) for i, name in zip(rows, names)]
        if cells:
            self.grid.text = H.image_grid(cells)
        else:
            self.grid.text = H.muted("Select images on the map (lasso or box) to see them here.")
        if len(sel):
            self.grid_info.text = H.page_info(f"images {start + 1:,}-{start + len(rows):,} of {len(sel):,} "
                                              f"(page {self.grid_page + 1} of {pages})")  # fmt: skip
        else:
            self.grid_info.text = H.page_info("no images selected")
        self.grid_prev.disabled = self.grid_page <= 0
        self.grid_next.disabled = self.grid_page >= pages - 1

    def _render_neighbours(self, row: int, idx: np.ndarray, dist: np.ndarray) -> None:
        labels = self.state.labels()
        cells = []
        for i, d in [(row, None)] + list(zip(idx.tolist(), dist.tolist())):
            name = self.state.project.names_of([i])[0]
            note = "this image" if d is None else f"distance {d:.3f}"
            cells.append(H.image_cell(self.thumb(i), name, self.state.label_text(labels[i]), note, query=d is None))
        self.grid.text = H.image_grid(cells, "ex-neighbours")
        self.grid_info.text = H.page_info(f"{len(idx)} nearest neighbours of {self.state.project.names_of([row])[0]}")
        self.grid_prev.disabled = self.grid_next.disabled = True

    def _legend_html(self) -> str:
        items = self.state.legend()
        shown = items[:300]
        return H.legend([(self.finder.group_text(v, t), c, n) for v, t, c, n in shown], len(items) - len(shown))

    def _status_html(self) -> str:
        st = self.state
        level, text = st.message
        return H.status(st.problems, level, text, self._links)

    # ------------------------------------------------------------------ callbacks
    def _on_select(self, attr: str, old: Any, new: Sequence[int]) -> None:
        if self._syncing:
            return
        idx = np.asarray(new, dtype=np.int64)
        idx = idx[(idx >= 0) & (idx < len(self.plot_rows))]
        self.state_select(self.plot_rows[idx])

    def state_select(self, rows: np.ndarray, mode: str = "replace") -> None:
        """A person selected ``rows`` on the map (dots: Bokeh's indices; image: the server's
        lasso); the state combines them with its selection by ``mode``
        (:data:`explorer.app.selection.SELECT_MODES`)."""
        st = self.state
        self.selection_callbacks += 1
        self._links = []
        st.select(rows, mode)
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
            Div(name="title", text=H.error_title(title), stylesheets=css),
            Div(
                name="status",
                text=H.error_message(message),
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
