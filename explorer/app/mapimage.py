"""Big maps as one server-rendered image; lasso, box and click resolved on the server.

Above :func:`explorer.app.density.image_threshold` drawn points an :class:`ImageMap` takes
over a session's map: the dots' source stays empty (no
per-point columns travel), the server renders the points in view as an RGBA image
(:func:`explorer.app.density.shade`) and re-renders it when the view range (Bokeh's
``RangesUpdate``), the selection, the colours or the point size change. Renders of more
than :data:`INLINE_POINTS` points run off the event loop, the newest request
winning (so a burst of wheel-zoom steps costs at most two renders), in a thread of their own
(:func:`render_pool`).

The select tools then act on an invisible two-point "bounds" renderer, so the browser
never sends a per-point index list: a small CustomJS sends the lasso / box / click
geometry (data coordinates, a few hundred numbers) with the selection mode (toolbar mode,
or Shift = append, Ctrl = intersect, both = subtract) through the ``lasso_geometry``
source, and :meth:`ImageMap.on_geometry` finds the points with numpy.

When at most :data:`THUMBS_IN_VIEW` points are in view, their thumbnails are sent (as in the
dot mode, where the browser finds them itself).

The map sees its session's view only through a :class:`MapPort` (the plot, the drawn rows
and their columns, a selection callback and a thumbnails sink), never the view itself.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from bokeh.events import RangesUpdate
from bokeh.models import ColumnDataSource, CustomJS, GlyphRenderer, Scatter

from explorer.app import density as D
from explorer.app import work
from explorer.app.html import GEOMETRY_JS
from explorer.app.selection import SELECT_MODES

__all__ = ["ImageMap", "MapPort", "INLINE_POINTS", "CLICK_PX", "THUMBS_IN_VIEW"]

#: thumbnails are drawn on the map when at most this many points are in view (both modes)
THUMBS_IN_VIEW = 300

#: renders of at most this many drawn points run on the event loop (a few ms)
INLINE_POINTS = 200_000
#: a click selects the nearest point within this many screen pixels
CLICK_PX = 6
#: frame size (height, width) used before the browser reports the real one (the map stretches
#: into the window; about its size in a 1600 x 1000 window)
DEFAULT_FRAME = (850, 830)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def render_pool() -> ThreadPoolExecutor:
    """The process-wide thread that renders big maps: its own, so a long save or zip in
    :func:`explorer.app.work.threads` never holds up a zoom (renders take ~0.1-0.3 s)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-map")
        return _pool


def empty_image() -> dict[str, Any]:
    return {"image": [], "x": [], "y": [], "dw": [], "dh": [], "n": [], "total": []}


@dataclass(frozen=True)
class MapPort:
    """What an :class:`ImageMap` uses of its session (the view builds one)."""

    #: the map's figure
    plot: Any
    #: the dots' renderer (hidden while the map is an image)
    dots: Any
    #: the session's state (colours, selection, point size, coordinates, messages)
    state: Any
    #: the drawn rows (source position -> row)
    drawn_rows: Callable[[], np.ndarray]
    #: float32 x, y and int32 colour code of the drawn rows
    columns: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
    #: a person's selection on the map: ``select(rows, mode)`` (:data:`SELECT_MODES`)
    select: Callable[[np.ndarray, str], None]
    #: draw these rows' thumbnails on the map (``None``: none)
    show_thumbs: Callable[[np.ndarray | None], None]
    #: the served Document, or ``None`` (tests, scripts: work runs at once)
    document: Callable[[], Any]


class ImageMap:
    """The image side of one session's map (see the module docstring); :attr:`active`
    tells which mode the map is in."""

    def __init__(self, port: MapPort) -> None:
        self.port = port
        plot = port.plot
        self.source = ColumnDataSource(data=empty_image(), name="map_image_source")
        self.renderer = plot.image_rgba(
            image="image", x="x", y="y", dw="dw", dh="dh", source=self.source, name="map_image", visible=False
        )
        # the data's padded extent: what the ranges fit, and what the select tools hit in image mode
        self.bounds_source = ColumnDataSource(data={"x": [], "y": []}, name="map_bounds_source")
        dot = Scatter(x="x", y="y", size=1, fill_alpha=0, line_alpha=0)
        self.bounds = GlyphRenderer(data_source=self.bounds_source, glyph=dot, selection_glyph=dot,
                                    nonselection_glyph=dot, name="map_bounds")  # fmt: skip
        plot.renderers.append(self.bounds)
        self.geometry = ColumnDataSource(
            data={"x": [], "y": [], "kind": [], "mode": [], "seq": []}, name="lasso_geometry"
        )
        self.active = False
        self.view_bounds: tuple[float, float, float, float] | None = None
        self._x = self._y = self._codes = np.zeros(0, dtype=np.float32)
        self._selected: np.ndarray | None = None
        #: the last binning (points in view -> pixel), reused while the view stays
        self._binned: D.Binned | None = None
        self._initial_bounds: tuple[float, float, float, float] | None = None
        self._running = False
        self._again = False
        self._queued = False
        #: renders shown so far (tests wait for a new one)
        self.renders = 0

    # ------------------------------------------------------------------ wiring
    def wire(self, lasso: Any, box: Any, tap: Any) -> None:
        """Connect the select tools' geometry and the plot's range updates."""
        self._tools = {"lasso": lasso, "box": box, "tap": tap}
        self._dot_renderers = {k: list(t.renderers) for k, t in self._tools.items()}
        self.port.plot.js_on_event(
            "selectiongeometry",
            CustomJS(args={"image": self.renderer, "geometry": self.geometry, "lasso": lasso, "box": box},
                     code=GEOMETRY_JS),
        )  # fmt: skip
        self.port.plot.on_event(RangesUpdate, self.on_ranges)
        for size in ("inner_width", "inner_height"):  # the map stretches with the window
            self.port.plot.on_change(size, lambda attr, old, new: self.request())
        self.geometry.on_change("data", self.on_geometry)

    def set_data(self, active: bool) -> None:
        """The map's rows changed (load, drill-down): take the drawn columns, fit the ranges,
        switch between dots and image."""
        x, y, codes = self.port.columns()
        b = D.padded_bounds(x, y, padding=0.0)
        self.bounds_source.data = {"x": [b[0], b[1]], "y": [b[2], b[3]]}
        self.active = bool(active)
        self.renderer.visible = self.active
        self.port.dots.visible = not self.active
        for key, tool in self._tools.items():
            want = [self.bounds] if self.active else self._dot_renderers[key]
            if list(tool.renderers) != want:  # each assignment re-walks the document's models
                tool.renderers = want
        self._binned = None
        if self.active:
            self._x, self._y, self._codes = x, y, codes
            self.view_bounds = self._initial_bounds = D.padded_bounds(x, y)
            self.set_selection()
        else:
            self._x = self._y = self._codes = np.zeros(0, dtype=np.float32)
            self._selected = None
            self.source.data = empty_image()

    def set_codes(self) -> None:
        if self.active:
            self._codes = self.port.columns()[2]

    def set_selection(self) -> None:
        """The session's selection as a mask over the drawn points (None: nothing selected)."""
        sel = self.port.state.selection
        if not self.active or not len(sel):
            self._selected = None
            return
        rows = self.port.drawn_rows()
        pos = np.searchsorted(rows, sel)
        ok = pos < len(rows)
        pos = pos[ok]
        pos = pos[rows[pos] == sel[ok]]
        mask = np.zeros(len(rows), dtype=bool)
        mask[pos] = True
        self._selected = mask

    # ------------------------------------------------------------------ rendering
    def _shape(self) -> tuple[int, int]:
        plot = self.port.plot
        try:
            w, h = plot.inner_width, plot.inner_height
        except Exception:  # not laid out by a browser yet (bokeh's UnsetValueError)
            return DEFAULT_FRAME
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 10 and h > 10:
            return int(h), int(w)
        return DEFAULT_FRAME

    def _radius(self) -> int:
        return int(min(4, max(0, self.port.state.point_size // 2 - 1)))

    def _job(self) -> dict[str, Any]:
        st = self.port.state
        _, palette, alphas, _ = st.color_codes()
        bounds = self.view_bounds or D.padded_bounds(self._x, self._y)
        shape = self._shape()
        b = self._binned
        same_view = b is not None and b.bounds == D.ordered_bounds(bounds) and b.shape == shape
        return {
            "x": self._x, "y": self._y, "codes": self._codes, "colors": D.rgb_table(palette),
            "alphas": np.asarray(alphas, dtype=np.float32), "bounds": bounds, "shape": shape,
            "selected": self._selected, "radius": self._radius(), "rows": self.port.drawn_rows(),
            "binned": b if same_view else None,
        }  # fmt: skip

    @staticmethod
    def compute(job: dict[str, Any], thumbs_limit: int) -> tuple[D.Shaded, np.ndarray | None, D.Binned]:
        """Render ``job`` (from :meth:`_job`); also the rows in view when at most
        ``thumbs_limit`` are (else None), and the binning. Pure: runs in a worker thread."""
        binned = job["binned"] or D.bin_points(job["x"], job["y"], job["bounds"], job["shape"])
        shaded = D.shade_binned(binned, job["codes"], job["colors"], job["alphas"],
                                selected=job["selected"], radius=job["radius"])  # fmt: skip
        rows = None
        if shaded.n_drawn <= thumbs_limit:
            pos = np.arange(len(job["x"])) if binned.keep is None else binned.keep
            rows = np.asarray(job["rows"])[pos]
        return shaded, rows, binned

    def _initial(self) -> tuple[D.Shaded, np.ndarray | None, D.Binned] | None:
        """The first view's image with nothing selected: the same for every session of a
        project (per colour column and point size), so it is rendered once per process."""
        st = self.port.state
        if (self._selected is not None or self.view_bounds != self._initial_bounds
                or self._shape() != DEFAULT_FRAME or st.drill or st.layout != "original"):
            return None
        return st.cached(f"map_image\0{self._radius()}", lambda: self.compute(self._job(), THUMBS_IN_VIEW))

    def request(self) -> None:
        """Re-render soon: served, on the next tick, so what changed with it (the table, the
        grid) reaches the browser first, in its own message; else at once."""
        doc = self.port.document()
        if not self.active:
            return
        if doc is None:
            self.refresh()
            return
        if self._queued:
            return
        self._queued = True

        def later() -> None:
            self._queued = False
            self.refresh()

        try:
            doc.add_next_tick_callback(later)
        except Exception:  # the session is gone
            self._queued = False

    def refresh(self) -> None:
        """Re-render the image for the current view, colours and selection (no-op in dot mode)."""
        if not self.active:
            return
        doc = self.port.document()
        first = self._initial()
        if first is not None:
            self._show(*first)
            return
        if doc is None or len(self._x) <= INLINE_POINTS:
            self._show(*self.compute(self._job(), THUMBS_IN_VIEW))
            return
        if self._running:  # the newest request wins; one render at a time per session
            self._again = True
            return
        self._running = True
        job = self._job()

        def on_loop(result: Any) -> None:
            self._running = False
            if isinstance(result, Exception):  # shown on the page, never lost in a thread
                self.port.state.refuse(f"map not drawn: {result}")
                result = None
            if self._again:
                self._again = False
                self.refresh()
            elif result is not None and self.active:
                self._show(*result)

        work.when_done(render_pool().submit(self.compute, job, THUMBS_IN_VIEW), doc, on_loop)

    def _show(self, shaded: D.Shaded, rows: np.ndarray | None, binned: D.Binned) -> None:
        self._binned = binned
        x0, x1, y0, y1 = shaded.bounds
        self.source.data = {
            "image": [shaded.image], "x": [x0], "y": [y0], "dw": [x1 - x0], "dh": [y1 - y0],
            "n": [shaded.n_drawn], "total": [len(self._x)],
        }  # fmt: skip
        self.port.show_thumbs(rows)
        self.renders += 1

    # ------------------------------------------------------------------ events
    def on_ranges(self, event: RangesUpdate) -> None:
        vals = (event.x0, event.x1, event.y0, event.y1)
        if not self.active or any(v is None or not np.isfinite(v) for v in vals):
            return
        if vals[0] == vals[1] or vals[2] == vals[3]:
            return
        self.view_bounds = tuple(float(v) for v in vals)  # type: ignore[assignment]
        self.refresh()

    def on_geometry(self, attr: str, old: Any, new: dict[str, Any]) -> None:
        """A lasso, box or click arrived as geometry: select the points it holds."""
        if not self.active or not len(new.get("x", ())):
            return
        kind = str(new["kind"][0])
        mode = str(new["mode"][0])
        self.port.select(self.rows_of(kind, new["x"], new["y"]), mode if mode in SELECT_MODES else "replace")

    def rows_of(self, kind: str, xs: Any, ys: Any) -> np.ndarray:
        """The drawn rows a ``kind`` ("poly", "rect", "point") geometry holds."""
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        if kind == "poly":
            pos = D.points_in_polygon(self._x, self._y, xs, ys)
        elif kind == "rect":
            pos = D.points_in_rect(self._x, self._y, (xs.min(), xs.max(), ys.min(), ys.max()))
        elif kind == "point":
            b = self.view_bounds or D.padded_bounds(self._x, self._y)
            h, w = self._shape()
            radius = (CLICK_PX * (b[1] - b[0]) / w, CLICK_PX * (b[3] - b[2]) / h)
            hit = D.nearest_point(self._x, self._y, (float(xs[0]), float(ys[0])), radius)
            pos = np.asarray([] if hit is None else [hit], dtype=np.int64)
        else:
            raise ValueError(f"geometry kind must be poly, rect or point, got {kind!r}")
        return np.asarray(self.port.drawn_rows())[pos].astype(np.int64)
