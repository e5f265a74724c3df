"""Bokeh wiring of the explorer app: widgets read and write an :class:`AppState`.

Every widget and source has a ``name=`` (tests find them with ``doc.select_one``).
Views re-render from the state when it reports a change; widget callbacks only call
state methods. One :class:`AppView` (and one state) per session: nothing is shared.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from bokeh.layouts import column, row
from bokeh.models import (
    Button,
    Checkbox,
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
    StringFormatter,
    TableColumn,
    TextInput,
    Toggle,
    BoxSelectTool,
)
from bokeh.plotting import figure

from explorer.app.state import LABEL_COLUMNS, AppState, ExportError, thumb_urls
from explorer.table import SchemaError

#: the DataTable shows at most this many selected rows (Save writes all of them)
TABLE_LIMIT = 2000
#: thumbnails per page of the selection grid
GRID_PAGE = 40
PLOT_WIDTH, PLOT_HEIGHT = 760, 620
SIDEBAR_WIDTH = 300

_DOWNLOAD_JS = """
const d = source.data;
const urls = d["url"] || [];
const names = d["filename"] || [];
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
  <img src="@thumb" alt="" style="max-width:160px;max-height:160px;display:block;margin-bottom:4px">
  <div style="font-weight:600;word-break:break-all">@name</div>
  <div>@code{custom}</div>
</div>
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _stylesheet(route: str) -> ImportedStyleSheet:
    return ImportedStyleSheet(url=f"/{route}/static/css/app.css")


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
        self.plot_rows = np.flatnonzero(st.valid).astype(np.int64)

        # ---------------------------------------------------------------- plot
        self.file_names = np.asarray(
            [p[max(p.rfind("/"), p.rfind("\\")) + 1 :] if isinstance(p, str) else "" for p in st.table["path"].tolist()],
            dtype=object,
        )
        thumbs = thumb_urls(st.table["image"], st.route)
        self.thumb_urls = thumbs
        r = self.plot_rows
        codes, palette, alphas, _ = st.color_codes()
        # only what the plot and its hover need; colours as int codes through a mapper
        self.color_mapper = LinearColorMapper(
            palette=palette or ["#000000"], low=-0.5, high=max(len(palette), 1) - 0.5, name="color_mapper"
        )
        self.hover_labels = CustomJSHover(args={"labels": self._label_texts()}, code="return labels[value] ?? ''")
        self.source = ColumnDataSource(
            data={
                "x": st.table["x"].to_numpy(dtype=float)[r],
                "y": st.table["y"].to_numpy(dtype=float)[r],
                "code": codes[r],
                "alpha": alphas[codes[r]].astype(np.float32) if len(palette) else np.zeros(0, np.float32),
                "thumb": thumbs[r],
                "name": self.file_names[r],
            },
            name="points",
        )
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
            fill_alpha="alpha",
            selection_fill_alpha=1.0,
            selection_line_color="black",
            selection_line_alpha=0.6,
            nonselection_fill_alpha=0.15,
            name="scatter",
        )
        lasso = LassoSelectTool(continuous=False, renderers=[self.renderer], name="lasso")
        box = BoxSelectTool(continuous=False, renderers=[self.renderer], name="box_select")
        hover = HoverTool(
            tooltips=_TOOLTIP, formatters={"@code": self.hover_labels}, renderers=[self.renderer], name="hover"
        )
        self.plot.add_tools(lasso, box, hover)
        self.plot.toolbar.active_drag = lasso

        # ---------------------------------------------------------------- sidebar
        self.title = Div(name="title", text=self._title_html(), stylesheets=css)
        self.status = Div(name="status", text="", stylesheets=css, width=PLOT_WIDTH + SIDEBAR_WIDTH)
        self.color_by = Select(
            name="color_by",
            title="Colour by (and filter on)",
            value=st.label_column,
            options=[c for c in LABEL_COLUMNS],
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
        self.downloads = ColumnDataSource(data={"url": [], "filename": []}, name="downloads")
        self.downloads.js_on_change("data", CustomJS(args={"source": self.downloads}, code=_DOWNLOAD_JS))

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

        sidebar = column(
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
        self.layout = column(
            self.title,
            self.status,
            row(self.plot, sidebar),
            row(self.grid_prev, self.grid_info, self.grid_next),
            self.grid,
            self.table_info,
            self.table,
            name="explorer",
        )
        self.render(frozenset({"selection", "filter", "label_column", "message"}))

    # ------------------------------------------------------------------ building
    def _label_texts(self) -> list[str]:
        """Hover text per colour code."""
        st = self.state
        return [f"{st.label_column}: {st.label_text(v)}" for v in st.color_codes()[3]]

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
        st = self.state
        cols = [
            TableColumn(
                field="_thumb",
                title="",
                width=60,
                sortable=False,
                formatter=HTMLTemplateFormatter(
                    template='<img src="<%- value %>" alt="" style="height:46px;max-width:56px">'
                ),
            ),
            TableColumn(field="_file", title="file name", width=180, formatter=StringFormatter()),
            TableColumn(field="_label", title="label", width=100, formatter=StringFormatter()),
        ]
        self._table_fields: list[tuple[str, str]] = []
        for i, name in enumerate(st.table.columns):
            if name == "label":
                continue
            field = f"c{i}"
            self._table_fields.append((field, name))
            dtype = st.table[name].dtype
            if pd.api.types.is_float_dtype(dtype):
                fmt: Any = NumberFormatter(format="0.000")
            elif pd.api.types.is_integer_dtype(dtype):
                fmt = NumberFormatter(format="0")
            else:
                fmt = StringFormatter()
            cols.append(TableColumn(field=field, title=str(name), formatter=fmt, width=90))
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

    def _table_data(self, rows: np.ndarray) -> dict[str, Any]:
        st = self.state
        rows = rows[:TABLE_LIMIT]
        sub = st.table.iloc[rows]
        data: dict[str, Any] = {
            "_thumb": list(self.thumb_urls[rows]),
            "_file": list(self.file_names[rows]),
            "_label": list(st.labels("label")[rows]),
        }
        for field, name in getattr(self, "_table_fields", []):
            col = sub[name]
            if pd.api.types.is_numeric_dtype(col.dtype):
                data[field] = col.to_numpy()
            else:
                data[field] = col.fillna("").astype(str).tolist()
        return data

    # ------------------------------------------------------------------ rendering
    def render(self, what: frozenset[str]) -> None:
        """Bring the widgets in line with the state (``what``: aspects that changed)."""
        st = self.state
        self._syncing = True
        try:
            if "label_column" in what:
                codes, palette, alphas, _ = st.color_codes()
                r = self.plot_rows
                self.color_mapper.update(
                    palette=palette or ["#000000"], low=-0.5, high=max(len(palette), 1) - 0.5
                )
                self.hover_labels.args = {"labels": self._label_texts()}
                alpha = alphas[codes[r]].astype(np.float32) if len(palette) else np.zeros(0, np.float32)
                self.source.data.update(code=codes[r], alpha=alpha)
                self.labels.options = st.label_options()
                self.color_by.value = st.label_column
                self.legend.text = self._legend_html()
                self.title.text = self._title_html()
            if "selection" in what:
                want = np.searchsorted(self.plot_rows, st.selection).tolist()
                if list(self.source.selected.indices) != want:
                    self.source.selected.indices = want
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
            if "message" in what:
                self.status.text = self._status_html()
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
        sel = self.state.selection
        pages = max(1, -(-len(sel) // GRID_PAGE))
        self.grid_page = min(max(self.grid_page, 0), pages - 1)
        start = self.grid_page * GRID_PAGE
        rows = sel[start : start + GRID_PAGE]
        labels = self.state.labels()
        cells = []
        for i in rows:
            name, label = _esc(self.file_names[i]), _esc(self.state.label_text(labels[i]))
            cells.append(
                f"<figure class='ex-cell'><img src='{_esc(self.thumb_urls[i])}' alt='' "
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

    def _legend_html(self) -> str:
        items = self.state.legend()
        shown = items[:300]
        rows = "".join(
            f"<div class='ex-legend-item'><span class='ex-swatch' style='background:{c}'></span>"
            f"<span class='ex-legend-text'>{_esc(t)}</span><span class='ex-count'>{n:,}</span></div>"
            for _, t, c, n in shown
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
        self.selection_callbacks += 1
        idx = np.asarray(new, dtype=np.int64)
        idx = idx[(idx >= 0) & (idx < len(self.plot_rows))]
        self._links = []
        self.state.select(self.plot_rows[idx])

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

    def _on_save(self) -> None:
        st = self.state
        try:
            result = st.export(self.save_name.value or "", images=bool(self.save_images.active))
        except ExportError as exc:
            self._links = []
            st.message = ("error", f"not saved: {exc}")
            self.status.text = self._status_html()
            return
        except OSError as exc:
            self._links = []
            st.message = ("error", f"saving failed: {exc}")
            self.status.text = self._status_html()
            return
        self._links = result.downloads
        self.status.text = self._status_html()
        self.downloads.data = {
            "url": [u for _, u in result.downloads],
            "filename": [n for n, _ in result.downloads],
        }


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
    """Fill ``doc`` with the explorer for the CSV named by ``argv`` (see ``find_csv``)."""
    from explorer.app import find_csv

    app_dir = Path(app_dir).resolve()
    route = app_dir.name
    doc.title = f"{route} - bulk image explorer"
    doc.template_variables["app_route"] = f"/{route}"
    try:
        csv = find_csv(argv, app_dir)
        state = AppState.from_csv(csv, app_dir=app_dir, route=route)
    except (SchemaError, FileNotFoundError, ValueError, OSError) as exc:
        error_page(doc, route, f"{route}: cannot show the images", str(exc))
        return None
    view = AppView(state)
    doc.add_root(view.layout)
    doc.add_root(view.downloads)  # not in the layout; a root so it reaches the browser
    doc.explorer_view = view  # lets tests reach the session's view and state
    return view
