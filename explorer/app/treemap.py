"""The Treemap tab: the group hierarchy one level at a time, tiles sized by image count.

Each tile is a sub-group of the open group (:mod:`explorer.stages.hierarchy`, the same tree as the
Overview tab: the build's ``NAME.hierarchy.npz`` read at project load, or built once per
process for builds without it). A tile shows a representative thumbnail, the name of
its dominant cluster (``cluster_name``) or the dominant value of the map's colour column,
and its image count; it is coloured by that dominant value.

* Tap a tile: its images are selected (map, table, grid) and, when it is split further,
  the treemap opens it. The breadcrumb buttons go back up; "All" clears the selection.
* A lasso (or any selection) on the map outlines the tiles it touches and says how many of
  each tile's images it holds.

The panel talks to the session through a narrow port: the state's public methods, a
``thumb(row) -> url`` function and a ``background(what, compute, finish)`` runner (the
view's pool, so building the tree never blocks the page). The layout of each level comes
from :func:`explorer.curation.treemap.level_tiles`; levels already laid out are kept per process
(:data:`_LEVELS`), so the first level of every later session costs no layout. The tile names
come from the project's per-process ``cluster_name`` codes
(:meth:`explorer.app.project.Project.name_codes`, computed when the hierarchy is loaded), so
the first session's first level costs what every later one does.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Callable

import numpy as np
from bokeh.layouts import column
from bokeh.models import Button, ColumnDataSource, Div, ImageURL, Range1d, TapTool
from bokeh.plotting import figure

from explorer.curation.treemap import Tiles, level_tiles

#: breadcrumb buttons (the hierarchy is at most 8 levels deep under the root)
MAX_CRUMBS = 9
#: tiles with a side shorter than this share of the plot get no thumbnail or text
MIN_SIDE = 0.06
MUTED = "#c8c8c8"

#: per process: (id(tree), group id, width, height) -> the level's tiles without codes or
#: selection (the geometry, counts and representatives do not depend on the session)
_LEVELS: dict[tuple, Tiles] = {}
#: per process: (id(name codes), id(tree), group id) -> each tile's dominant cluster name
_NAMES: dict[tuple, Any] = {}
_lock = threading.Lock()


def cached_level(tree, group_id: str, width: float, height: float) -> Tiles:
    """The session-independent part of a level, laid out once per process."""
    key = (id(tree), group_id, float(width), float(height))
    with _lock:
        hit = _LEVELS.get(key)
    if hit is None:
        hit = level_tiles(tree, group_id, width, height)
        with _lock:
            if len(_LEVELS) > 4096:
                _LEVELS.clear()
            _LEVELS[key] = hit
    return hit


def cluster_names(name_codes: tuple[np.ndarray, np.ndarray] | None, tree, tiles: Tiles) -> list[str]:
    """The most frequent non-empty name of each tile ("" without names).

    ``name_codes``: (distinct names, code per row), e.g.
    :meth:`explorer.app.project.Project.name_codes`; kept per process for each level."""
    if name_codes is None:
        return [""] * len(tiles.ids)
    values, codes = name_codes
    key = (id(codes), id(tree), tiles.group_id)
    with _lock:
        hit = _NAMES.get(key)
    if hit is not None:
        return hit
    empty = np.flatnonzero(values == "")
    names = []
    for gid in tiles.ids:
        bc = np.bincount(codes[tree.node(gid).members], minlength=len(values))
        if len(empty):
            bc[empty] = 0
        names.append(str(values[int(bc.argmax())]) if bc.max() > 0 else "")
    with _lock:
        if len(_NAMES) > 4096:
            _NAMES.clear()
        _NAMES[key] = names
    return names


class TreemapPanel:
    """The widgets of the Treemap tab for one session (see the module docstring); a panel as
    :mod:`explorer.app.panel` describes (``title``, ``panel``, ``render``, ``opened``)."""

    title = "Treemap"

    def __init__(self, state: Any, thumb: Callable[[int], str],
                 background: Callable[[str, Callable[[], Any], Callable[[Any], None]], None],
                 *, width: int = 300, height: int = 360, stylesheets: list | None = None) -> None:
        self.state = state
        self.thumb = thumb
        self.background = background
        self.width, self.height = float(width) / height, 1.0  # data units: the plot's aspect
        self.tiles: Tiles | None = None
        self._own_names: tuple[Any, Any] | None = None  # (table, codes) after a metadata join
        self._opened = False
        self._syncing = False
        css = stylesheets or []
        self.source = ColumnDataSource(name="treemap_tiles", data=self._empty())
        self.figure = figure(
            name="treemap", width=width, height=height, tools="", toolbar_location=None,
            x_range=Range1d(0, self.width), y_range=Range1d(0, self.height), title=None,
            min_border=0,
        )  # fmt: skip
        self.figure.axis.visible = False
        self.figure.grid.visible = False
        self.figure.outline_line_color = None
        quads = self.figure.quad(
            left="left", right="right", bottom="bottom", top="top", source=self.source,
            fill_color="color", fill_alpha=0.8, line_color="line", line_width="lw",
            selection_fill_alpha=0.8, nonselection_fill_alpha=0.8, name="treemap_quads",
        )  # fmt: skip
        self.figure.add_glyph(self.source, ImageURL(url="url", x="cx", y="cy", w="side", h="side",
                                                    anchor="center"), name="treemap_thumbs")
        self.figure.text(x="tx", y="ty", text="text", source=self.source, text_font_size="10px",
                         text_baseline="top", text_align="left", text_color="#111111",
                         name="treemap_text")
        self.figure.add_tools(TapTool(renderers=[quads], name="treemap_tap"))
        self.crumbs = [Button(name=f"treemap_crumb_{i}", label="", visible=False, width=width)
                       for i in range(MAX_CRUMBS)]
        for i, b in enumerate(self.crumbs):
            b.on_click(lambda i=i: self.go_up(i))
        self.info = Div(name="treemap_info", text="", stylesheets=css, width=width)
        self.source.selected.on_change("indices", self._on_tap)
        self.panel = column(self.info, *self.crumbs, self.figure, name="treemap_panel", width=width)

    # ------------------------------------------------------------------ actions
    def open(self) -> None:
        """The tab was opened: build the hierarchy (once per process, off the event loop)."""
        st = self.state
        if st.tree is not None:
            self._opened = True
            self.draw()
            return
        if not st.has_features:
            st.overview()  # says why there is none
            return
        if self._opened:
            return
        self._opened = True

        def finish(tree: Any) -> None:
            if isinstance(tree, Exception):
                self._opened = False
                self.info.text = f"<div class='ex-muted'>no treemap: {html.escape(str(tree))}</div>"
                return
            self.draw()

        self.info.text = "<div class='ex-muted'>building the hierarchy (once for every session)...</div>"
        self.background("building the treemap (once for every session)", st.overview_compute, finish)

    opened = open  # the view calls it when a person opens the tab

    def tap(self, index: int) -> None:
        """Tile ``index`` was tapped: select its images and open it when it is split further."""
        tiles = self.tiles
        if tiles is None or not 0 <= index < len(tiles.ids):
            return
        gid = tiles.ids[index]
        st = self.state
        if not tiles.leaf and st.tree.children(gid):
            st.open_group(gid)
        st.select_group(gid)

    def go_up(self, depth: int) -> None:
        """Breadcrumb ``depth`` (0 = the whole set): open that level, select its images."""
        st = self.state
        if st.tree is None:
            return
        trail = st.tree.breadcrumbs(st.overview_id)
        if depth >= len(trail):
            return
        gid = trail[depth]
        st.open_group(gid)
        if gid == "root":
            st.select([])
        else:
            st.select_group(gid)

    # ------------------------------------------------------------------ drawing
    def render(self, what: frozenset[str]) -> None:
        """State changed: redraw when the open group, selection, colours or labels did."""
        if not self._opened or self.state.tree is None:
            return
        if what & {"overview", "selection", "map", "label_column", "labels"}:
            self.draw()

    def draw(self) -> None:
        st = self.state
        tree = st.tree
        if tree is None:
            return
        gid = st.overview_id if st.overview_id in tree else "root"
        base = cached_level(tree, gid, self.width, self.height)
        codes, palette, alphas, values = st.color_codes()
        mask = None
        if len(st.selection):
            mask = np.zeros(tree.n_images, dtype=bool)
            mask[st.selection[st.selection < tree.n_images]] = True
        tiles = level_tiles(tree, gid, self.width, self.height,
                            codes=codes if len(codes) == tree.n_images else None, selected=mask)
        self.tiles = tiles
        names = cluster_names(self._name_codes(), tree, base)
        r = tiles.rects
        w, h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
        big = (np.minimum(w, h) >= MIN_SIDE * self.height)
        side = np.minimum(w, h) * 0.55
        colours, texts = [], []
        muted = st.muted_value()
        for t in range(len(tiles.ids)):
            d = int(tiles.dominant[t])
            value = values[d] if 0 <= d < len(values) else ""
            colours.append(MUTED if d < 0 or value == muted else palette[d])
            name = names[t] or (f"{st.label_column} {value}" if value != "" else tiles.ids[t])
            text = f"{name}\n{int(tiles.counts[t]):,} images"
            if tiles.selected[t]:
                text += f"\n{int(tiles.selected[t]):,} selected"
            texts.append(text if big[t] else "")
        touched = tiles.selected > 0
        pad = 0.01 * self.height
        self._syncing = True
        try:
            self.source.selected.indices = []
            self.source.data = {
                "left": r[:, 0], "right": r[:, 2], "bottom": r[:, 1], "top": r[:, 3],
                "id": list(tiles.ids), "count": tiles.counts, "color": colours,
                "line": ["#111111" if s else "#ffffff" for s in touched],
                "lw": np.where(touched, 3.0, 1.0),
                "url": [self.thumb(int(rep)) if b else "" for rep, b in zip(tiles.representative, big)],
                "cx": (r[:, 0] + r[:, 2]) / 2, "cy": (r[:, 1] + r[:, 3]) / 2 - 0.08 * h,
                "side": np.where(big, side, 0.0),
                "tx": r[:, 0] + pad, "ty": r[:, 3] - pad, "text": texts,
                "selected": tiles.selected, "name": [names[t] for t in range(len(tiles.ids))],
            }
        finally:
            self._syncing = False
        trail = tree.breadcrumbs(gid)
        for i, b in enumerate(self.crumbs):
            if i < len(trail):
                node = tree.node(trail[i])
                b.label = ("All" if i == 0 else f"▸ {trail[i]}") + f" ({node.count:,})"
                b.visible = True
                b.button_type = "primary" if i == len(trail) - 1 else "default"
            else:
                b.visible = False
        sel = int(touched.sum())
        self.info.text = (
            f"<div class='ex-muted'>{html.escape(gid)}: {len(tiles.ids)} tile(s)"
            + (f", {sel} touched by the selection" if sel else "")
            + (" (not split further)" if tiles.leaf else " - tap a tile to open it") + "</div>"
        )

    def _name_codes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The project's per-process ``cluster_name`` codes, or this session's own after a
        metadata join gave it its own table."""
        from explorer.app.project import text_codes

        st = self.state
        table = st.table
        if table is st.project.table:
            return st.project.name_codes()
        if "cluster_name" not in table.columns:
            return None
        if self._own_names is None or self._own_names[0] is not table:
            self._own_names = (table, text_codes(table["cluster_name"]))
        return self._own_names[1]

    # ------------------------------------------------------------------ wiring
    def _on_tap(self, attr: str, old: Any, new: list[int]) -> None:
        if self._syncing or not new:
            return
        self.tap(int(new[0]))

    @staticmethod
    def _empty() -> dict[str, list]:
        keys = ("left", "right", "bottom", "top", "id", "count", "color", "line", "lw", "url", "cx",
                "cy", "side", "tx", "ty", "text", "selected", "name")
        return {k: [] for k in keys}
