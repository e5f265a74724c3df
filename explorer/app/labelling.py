"""The Label tab's "label a few, the tool labels the rest" section.

:class:`LabellingFlow` is the logic over an :class:`~explorer.app.state.AppState`, through its
public methods only (``select``, ``apply_label``, ``accept_predictions``, ``undo_labels``,
``features``, ``book``): the batch to label next and the cursor in it, the last propagation
and the accuracy curve. :class:`LabellingPanel` is its Bokeh widgets: "Label next" shows a
grid of the proposed images, one button per label (keys 1-9 press them: a small JS listener
on the page), Propagate, "Select sure" / "Select unsure" (on the map), "Accept all sure",
"Review unsure" (the least confident first) and the curve of the estimated accuracy against
the number of labels (a small chart and a line of text). The view adds it to the Label tab
with one line. Served, the picks and the model run in the view's thread pool (the flow's
``*_compute`` methods, which read only the shared read-only project); reading the labels
(``*_plan``) and showing the result (``show_*``) run on the event loop.

After Propagate the map can be coloured by "prediction" (the predicted label; labelled
images by their label) or "confidence" (binned, a continuous palette): colour columns of the
session (:class:`explorer.app.selection.ColourColumn`), drawn by the map's one colour path.
"Re-map with my labels" computes a semi-supervised layout in the worker process
(:func:`explorer.curation.remap.remap_build`, written beside the build as ``NAME.layout-labels.npz``,
never over the original layout); a switch shows either layout, and the clusters of the new
layout are one more colour column. A reload finds the file and offers the switch again.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import numpy as np

from explorer.curation import active
from explorer.app.curation import ORIGINAL_LAYOUT
from explorer.app.selection import ColourColumn

#: images proposed per "Label next"
BATCH = 20
#: label buttons (keys 1-9)
KEYS = 9
#: the colour columns Propagate adds, the layout and colour column Re-map adds
PREDICTION, CONFIDENCE = "prediction", "confidence"
WITH_LABELS = "with my labels"
REMAP_CLUSTER = "cluster (with my labels)"
#: the layouts the map's switch offers, in its order
LAYOUTS = (ORIGINAL_LAYOUT, WITH_LABELS)
#: confidence bins (lower edges; the last bin ends at 100%) and their colours (Viridis:
#: dark = unsure, yellow = sure)
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
CONFIDENCE_COLOURS = ("#440154", "#46317E", "#365A8C", "#277E8E", "#1EA087", "#49C16D",
                      "#9DD93A", "#FDE724")
#: the value of labelled images in the confidence colouring (drawn grey)
LABELLED = "labelled"
#: what "sure" may mean (the share of sure predictions expected right), offered in the tab
SURE_CHOICES = (0.9, 0.95, active.SURE_PRECISION, 0.99)


def _bin_names(edges: tuple[float, ...] = CONFIDENCE_EDGES) -> list[str]:
    ends = list(edges[1:]) + [1.0]
    return [f"{a:.0%}-{b:.0%}" if a > 0 else f"< {b:.0%}" for a, b in zip(edges, ends)]


def prediction_column(table: Any) -> ColourColumn:
    """The predicted label of every row (:func:`explorer.curation.active.label_table`'s
    ``predicted_label``: labelled rows keep their own label); ``""`` where there is none."""
    return ColourColumn(table["predicted_label"].fillna("").astype(str).to_numpy(dtype=object),
                        muted="", muted_text="(no prediction)")


def confidence_column(table: Any) -> ColourColumn:
    """Every predicted row's confidence in bins (:data:`CONFIDENCE_EDGES`) with a continuous
    palette, low to high; labelled rows are :data:`LABELLED` (grey)."""
    names = np.asarray(_bin_names(), dtype=object)
    conf = table["confidence"].to_numpy(dtype=float)
    idx = np.clip(np.searchsorted(np.asarray(CONFIDENCE_EDGES), np.nan_to_num(conf), side="right") - 1,
                  0, len(names) - 1)
    out = names[idx]
    out[(table["label_source"] != "predicted").to_numpy()] = LABELLED
    colours = dict(zip(names.tolist(), CONFIDENCE_COLOURS))
    return ColourColumn(out, colours=colours, muted=LABELLED, muted_text="labelled (no prediction needed)")


class LabellingFlow:
    """Label next -> label with one click -> propagate -> accept sure, over one session."""

    def __init__(self, state: Any):
        self.state = state
        self.batch: list[int] = []
        self.reasons: list[str] = []
        self.cursor = 0
        self.table = None  # explorer.curation.active.label_table's DataFrame
        self.info: dict[str, Any] | None = None
        #: (labels, estimated accuracy, cross-validated accuracy or None), one per propagate
        self.curve: list[tuple[int, float, float | None]] = []
        #: what "sure" means for this session (:func:`explorer.curation.active.check_precision`)
        self.precision = active.SURE_PRECISION

    # ------------------------------------------------------------------ inputs
    @property
    def X(self) -> np.ndarray:
        """The labelling's features of every row (:func:`explorer.curation.active.features`),
        made once per server process and shared by its sessions (the rows never change)."""
        def make():
            X = active.features(self.state.features())
            X.setflags(write=False)
            return X
        return self.state.project.cached("labelling-features", make)

    @property
    def graph(self) -> np.ndarray | None:
        """The neighbour graph of :attr:`X`, made on the first propagate of any session and
        shared by all (minutes at 200,000 rows)."""
        def make():
            g = active.neighbours(self.X)
            if g is not None:
                g.setflags(write=False)
            return g
        return self.state.project.cached("labelling-graph", make)

    @property
    def smoothed(self) -> np.ndarray | None:
        """:attr:`X` smoothed over :attr:`graph` (:func:`explorer.curation.active.smooth_rows`,
        the picks' space and the second probe's rows), made once beside the graph and shared by
        all sessions (seconds at 200,000 rows, on every "next" and propagate before)."""
        def make():
            g = self.graph
            if g is None:
                return None
            rows = active.smooth_rows(self.X, g)
            rows.setflags(write=False)
            return rows
        return self.state.project.cached("labelling-smoothed", make)

    def labels(self) -> list[str]:
        """Every row's label now ("" = none): what the model fits on."""
        return list(self.state.labels_of(range(self.state.n_rows), "label"))

    def classes(self) -> list[str]:
        """The label buttons, most used first ("discard" last)."""
        names = [n for n in self.state.label_names() if n != "discard"]
        return names[:KEYS - 1] + ["discard"]

    # ------------------------------------------------------------------ label next
    # Each action is a plan (the labels now: on the event loop, fast), a compute (the model:
    # any thread, reads only the shared read-only project) and a show (on the loop); the
    # panel runs the compute off the event loop, the plain methods run all three at once.
    def label_next(self, n: int = BATCH) -> list[int]:
        """Propose the next batch (rows), the first one current."""
        return self.show_batch(self.next_compute(self.labels(), n))

    def next_compute(self, labels: list[str], n: int = BATCH) -> list[dict[str, Any]]:
        """The images to label next given ``labels`` (:func:`explorer.curation.active.next_rows`)."""
        return active.next_rows(self.state.keys, labels, self.X, n,
                                graph=lambda: self.graph,  # made once the picks need it
                                smoothed=lambda: self.smoothed)

    def show_batch(self, picks: list[dict[str, Any]]) -> list[int]:
        """``picks`` (:meth:`next_compute`) as the batch, the first image not labelled
        meanwhile current."""
        self.batch = [p["row"] for p in picks]
        self.reasons = [p["reason"] for p in picks]
        self.cursor = 0
        if not picks:
            self.state.say("every image has a label: nothing to propose")
            self.state.emit("message")
        self._show_current()
        self.skip_labelled()
        return self.batch

    def review_unsure(self, n: int = BATCH) -> list[int]:
        """The least confident predictions of the last propagation, as the batch."""
        if self.table is None:
            self.propagate()
        t = self.table
        un = np.flatnonzero((t["label"] == "").to_numpy() & (t["label_source"] == "predicted").to_numpy())
        order = un[np.argsort(t["confidence"].to_numpy()[un], kind="stable")][:n]
        self.batch = [int(r) for r in order]
        self.reasons = [f"least sure: {t['predicted_label'].iat[r]!r} at {t['confidence'].iat[r]:.0%}"
                        for r in order]
        self.cursor = 0
        self._show_current()
        return self.batch

    @property
    def current(self) -> int | None:
        return self.batch[self.cursor] if self.cursor < len(self.batch) else None

    def _show_current(self) -> None:
        if self.current is not None:
            self.state.select([self.current])

    def label_current(self, label: str) -> bool:
        """Give the current image of the batch ``label`` (one journaled step), go to the next."""
        row = self.current
        if row is None:
            return False
        self.state.select([row])
        ok = self.state.apply_label(label)
        self.skip_labelled()
        return ok

    def skip_labelled(self) -> None:
        """Move the cursor past images of the batch that have a label now (given by a button,
        a key, or typed in the label field) and select the next one on the map."""
        moved = False
        while self.current is not None and self.state.labels_of([self.current], "label")[0]:
            self.cursor += 1
            moved = True
        if moved:
            self._show_current()

    def press(self, key: int) -> bool:
        """Keys 1-9: the label of button ``key``."""
        names = self.classes()
        if not 1 <= key <= len(names):
            return False
        return self.label_current(names[key - 1])

    # ------------------------------------------------------------------ propagate / accept
    def propagate(self) -> dict[str, Any]:
        return self.show_propagation(self.propagate_compute(self.propagate_plan()))

    def propagate_plan(self) -> tuple[list[str], list[str], float]:
        """The labels and their sources now, and what "sure" means (what
        :meth:`propagate_compute` fits on)."""
        return self.labels(), self.state.book.sources(self.state.keys), self.precision

    def propagate_compute(self, plan: tuple[list[str], list[str], float]) -> tuple[Any, dict[str, Any]]:
        """:func:`explorer.curation.active.label_table` of ``plan`` (the graph and the
        smoothed rows are made on the first call of the process)."""
        labels, sources, precision = plan
        return active.label_table(self.state.keys, labels, sources, self.X, graph=self.graph,
                                  smoothed=self.smoothed, precision=precision)

    def set_precision(self, precision: Any) -> None:
        """What "sure" means from now on (``ValueError`` naming a bad value)."""
        self.precision = active.check_precision(precision)

    def show_propagation(self, result: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
        """Keep ``result`` (:meth:`propagate_compute`): a point on the curve, the map's
        prediction and confidence colours."""
        self.table, self.info = result
        if self.info["estimated_accuracy"] is not None:
            n = self.info["labels"]
            point = (n, self.info["estimated_accuracy"], self.info["cv_accuracy"])
            self.curve = sorted([p for p in self.curve if p[0] != n] + [point], key=lambda p: p[0])
            self.state.set_colour_column(PREDICTION, prediction_column(self.table))
            self.state.set_colour_column(CONFIDENCE, confidence_column(self.table))
        return self.info

    def rows_where(self, sure: bool) -> np.ndarray:
        if self.table is None:
            return np.zeros(0, np.int64)
        t = self.table
        pred = (t["label_source"] == "predicted").to_numpy()
        return np.flatnonzero(pred & (t["sure"].to_numpy() == sure))

    def accept_sure(self) -> bool:
        """Every sure prediction becomes a label: one undoable step, journaled as accepted."""
        if self.table is None:
            self.propagate()
        ok = self.accept_shown()
        if ok:
            self.propagate()
        return ok

    def accept_shown(self) -> bool:
        """Accept the sure predictions of the last propagation (images labelled since keep
        their label); the caller propagates again."""
        if self.table is None:
            return False
        t = self.table.iloc[self.rows_where(True)]
        return self.state.accept_predictions(dict(zip(t["path"], t["predicted_label"])),
                                             threshold=self.info["threshold"],
                                             sure_precision=self.info["sure_precision"])


    # ------------------------------------------------------------------ re-map
    def remap_plan(self) -> tuple[Any, ...] | None:
        """The arguments of :func:`explorer.curation.remap.remap_build` (csv, features file or
        array, labels, keys), or None with the reason on the page."""
        st = self.state
        if not st.has_features:
            st.refuse(f"cannot re-map: {st.features_problem}")
            return None
        if st.csv_path is None:
            st.refuse("cannot re-map: there is no build file to keep the layout beside")
            return None
        labels = self.labels()
        if not any(labels):
            st.refuse("label some images first: the new layout learns from your labels")
            return None
        path = st.features_path
        vectors = str(path) if path is not None and path.is_file() else st.features()
        return str(st.csv_path), vectors, labels, list(st.keys)

    def remapped(self, result: Any = None, announce: bool = True) -> bool:
        """Offer the layout with the person's labels and its clusters (from ``result`` just
        computed, else from the build's sidecar if there is one for these rows). Shared by
        the sessions of the process (cached per file version)."""
        from explorer.curation import remap

        st = self.state
        if st.csv_path is None:
            return False
        path = remap.sidecar_path(st.csv_path)
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            return False

        def make() -> dict[str, Any] | None:
            data = ({"xy": result.xy, "cluster": result.cluster} if result is not None
                    else remap.load(st.csv_path, st.keys))
            if data is None:
                return None
            cl = np.asarray(data["cluster"]).astype(str).astype(object)
            cl.setflags(write=False)
            return {"layout": st.layout_arrays(data["xy"]), "cluster": cl}

        entry = st.project.cached(f"layout-labels\0{version}", make)
        if entry is None:
            return False
        st.add_layout(WITH_LABELS, entry["layout"], announce=announce)
        st.set_colour_column(REMAP_CLUSTER, ColourColumn(entry["cluster"], muted="-1",
                                                         muted_text="noise (-1)"), announce=announce)
        return True


class LabellingPanel:
    """Widgets of :class:`LabellingFlow` (``panel`` goes into the Label tab)."""

    def __init__(self, state: Any, css: list[Any], width: int,
                 background: Callable[..., None] | None = None):
        from bokeh.models import (Button, ColumnDataSource, CustomJS, Div, RadioButtonGroup, Range1d,
                                  Select, TextInput)
        from bokeh.layouts import column, row
        from bokeh.plotting import figure

        self.state = state
        self.flow = LabellingFlow(state)
        #: the view's ``background(what, compute, finish, ...)`` (slow work off the event loop)
        self.background = background
        half = (width - 10) // 2
        self.next = Button(name="label_next", label=f"Label next ({BATCH})", button_type="primary",
                           width=half)
        self.review = Button(name="review_unsure", label="Review unsure", width=half)
        self.batch = Div(name="label_batch", text="", stylesheets=css, width=width)
        self.buttons = [Button(name=f"label_key_{i + 1}", label="", width=half, visible=False)
                        for i in range(KEYS)]
        self.key = TextInput(name="label_key", value="", visible=False)
        self.propagate = Button(name="propagate", label="Propagate", width=half)
        self.accept = Button(name="accept_sure", label="Accept all sure", button_type="success",
                             width=half)
        self.sure_means = Select(name="sure_precision", title="Sure means", width=width,
                                 value=str(self.flow.precision),
                                 options=[(str(p), f"{p:.0%} of them right") for p in SURE_CHOICES])
        self.sure = Button(name="select_sure", label="Select sure", width=half)
        self.unsure = Button(name="select_unsure", label="Select unsure", width=half)
        self.report = Div(name="label_report", text="", stylesheets=css, width=width)
        # the accuracy curve: one point per Propagate
        self.curve = ColumnDataSource(data={"labels": [], "estimated": [], "cv": []}, name="accuracy_curve")
        self.chart = figure(name="accuracy_chart", width=width, height=170, tools="", toolbar_location=None,
                            x_axis_label="labels", y_axis_label="accuracy", y_range=Range1d(0, 1.02),
                            visible=False)
        self.chart.line("labels", "estimated", source=self.curve, line_width=2, legend_label="estimated")
        self.chart.scatter("labels", "estimated", source=self.curve, size=6)
        self.chart.line("labels", "cv", source=self.curve, line_dash="dashed", color="#ff7f0e",
                        legend_label="cross-validated")
        self.chart.legend.location = "bottom_right"
        self.chart.legend.label_text_font_size = "9pt"
        self.chart.legend.padding = self.chart.legend.spacing = 2
        self.remap = Button(name="remap", label="Re-map with my labels", width=width)
        self.layout_switch = RadioButtonGroup(name="layout_switch", labels=list(LAYOUTS), active=0,
                                              width=width, visible=False)
        pairs = [row(*self.buttons[i:i + 2]) for i in range(0, KEYS, 2)]
        self.panel = column(Div(text="<b>Label a few, the tool labels the rest</b>", width=width),
                            row(self.next, self.review), self.batch, *pairs, self.key,
                            self.sure_means, row(self.propagate, self.accept),
                            row(self.sure, self.unsure),
                            self.report, self.chart, self.remap, self.layout_switch,
                            name="labelling_panel", width=width)
        # keys 1-9 anywhere on the page but in a text field: the hidden input carries them
        self.keys_js = CustomJS(args={"key": self.key}, code="""
            if (window._explorer_keys) { return; }
            window._explorer_keys = true;
            document.addEventListener('keydown', (e) => {
                const t = e.target && e.target.tagName;
                if (t === 'INPUT' || t === 'TEXTAREA' || e.ctrlKey || e.metaKey || e.altKey) { return; }
                if (e.key >= '1' && e.key <= '9') { key.value = e.key + ':' + Date.now(); }
            });""")
        self.next.js_on_click(self.keys_js)
        self.next.on_click(self._on_next)
        self.review.on_click(self._on_review)
        for i, b in enumerate(self.buttons):
            b.on_click(lambda i=i: self._on_press(i + 1))
        self.key.on_change("value", self._on_key)
        self.propagate.on_click(self._on_propagate)
        self.accept.on_click(self._on_accept)
        self.sure_means.on_change("value", self._on_sure_means)
        self.sure.on_click(lambda: self.state.select(self.flow.rows_where(True)))
        self.unsure.on_click(lambda: self.state.select(self.flow.rows_where(False)))
        self.remap.on_click(self._on_remap)
        self.layout_switch.on_change("active", self._on_layout)
        state.subscribe(self._on_state)
        # a layout made earlier (this build's NAME.layout-labels.npz): the switch offers it
        self.flow.remapped(announce=False)
        self.render()

    # ------------------------------------------------------------------ callbacks
    def _off_loop(self, what: str, compute: Callable[[], Any], show: Callable[[Any], Any]) -> None:
        """``compute()`` in the view's pool (every session stays responsive: at 200,000 images
        the first "Label next" makes the neighbour graph, 37 s in bench/app_labelling.py),
        then ``show(result)`` and a render on the loop; an error is said on the page."""
        def finish(result: Any) -> None:
            if isinstance(result, Exception):
                self.state.refuse(f"{what} failed: {result}")
                return
            show(result)
            self.render()

        if self.background is None:  # no view (scripts): at once
            finish(_call(compute))
        else:
            self.background(what, compute, finish, drop_if_moved=False)

    def _on_next(self) -> None:
        labels = self.flow.labels()
        self._off_loop("choosing the images to label next",
                       lambda: self.flow.next_compute(labels), self.flow.show_batch)

    def _propagate_then(self, then: Callable[[], Any] | None = None) -> None:
        plan = self.flow.propagate_plan()

        def show(result: Any) -> None:
            self.flow.show_propagation(result)
            if then is not None:
                then()

        self._off_loop("propagating your labels", lambda: self.flow.propagate_compute(plan), show)

    def _on_review(self) -> None:
        if self.flow.table is None:
            self._propagate_then(self.flow.review_unsure)
        else:
            self.flow.review_unsure()
            self.render()

    def _on_press(self, k: int) -> None:
        self.flow.press(k)
        self.render()

    def _on_key(self, attr: str, old: str, new: str) -> None:
        if new and new[0].isdigit():
            self._on_press(int(new[0]))

    def _on_propagate(self) -> None:
        self._propagate_then()

    def _on_sure_means(self, attr: str, old: str, new: str) -> None:
        try:
            self.flow.set_precision(new)
        except ValueError as exc:
            self.state.refuse(str(exc))
            return
        if self.flow.table is not None:  # the predictions shown: sure again by the new target
            self._propagate_then()

    def _on_accept(self) -> None:
        if self.flow.table is None:  # nothing shown yet: propagate first, then accept
            self._propagate_then(self._accept_shown)
        else:
            self._accept_shown()

    def _accept_shown(self) -> None:
        if self.flow.accept_shown():
            self._propagate_then()  # the model with the accepted labels
        self.render()

    def _on_remap(self) -> None:
        from explorer.curation.remap import remap_build

        plan = self.flow.remap_plan()
        if plan is None:
            return
        if self.background is None:  # no view (scripts): at once
            self._remap_done(_call(remap_build, *plan))
            return
        self.background("re-mapping with your labels", remap_build, self._remap_done,
                        drop_if_moved=False, pool="processes", args=plan)

    def _remap_done(self, result: Any) -> None:
        st = self.state
        if isinstance(result, Exception):
            st.refuse(f"not re-mapped: {result}")
            return
        if not self.flow.remapped(result):
            st.refuse("not re-mapped: the new layout could not be read back")
            return
        st.set_layout(WITH_LABELS)
        note = f" ({'; '.join(result.notes)})" if result.notes else ""
        n_cl = len(set(result.cluster.tolist()) - {-1})
        extra = f" and {result.predicted:,} sure prediction(s)" if result.predicted else ""
        st.say(f"re-mapped with {result.labelled:,} labelled image(s){extra}: map '{WITH_LABELS}', "
               f"{n_cl} cluster(s) in colour '{REMAP_CLUSTER}'{note}")
        st.emit("message")
        self.render()

    def _on_layout(self, attr: str, old: int, new: int) -> None:
        if self._rendering or new is None:
            return
        if not self.state.set_layout(LAYOUTS[new]):
            self.render()

    def _on_state(self, what: frozenset[str]) -> None:
        if "labels" in what:
            self.flow.skip_labelled()
            self.render()
        elif "map" in what:
            self.render()

    # ------------------------------------------------------------------ rendering
    def _render_buttons(self) -> None:
        names = self.flow.classes()
        for i, b in enumerate(self.buttons):
            b.visible = i < len(names)
            b.label = f"{i + 1}  {names[i]}" if i < len(names) else ""

    _rendering = False

    def render(self) -> None:
        self._rendering = True
        try:
            self._render()
        finally:
            self._rendering = False

    def _render(self) -> None:
        f = self.flow
        st = self.state
        self.layout_switch.visible = WITH_LABELS in st.layouts
        want = LAYOUTS.index(st.layout) if st.layout in LAYOUTS else 0
        if self.layout_switch.active != want:
            self.layout_switch.active = want
        if f.curve:
            n, est, cv = zip(*f.curve)
            data = {"labels": list(n), "estimated": list(est),
                    "cv": [float("nan") if c is None else c for c in cv]}
            if data != self.curve.data:
                self.curve.data = data
        self.chart.visible = bool(f.curve)
        self._render_buttons()
        cells = []
        for i, (r, why) in enumerate(zip(f.batch, f.reasons)):
            cur = " style='outline:3px solid #e6550d'" if i == f.cursor else ""
            done = i < f.cursor
            cells.append(f"<figure class='ex-cell'{cur}><img src='{html.escape(self.state.thumb_url(r))}' "
                         f"alt='' title='{html.escape(why)}'><figcaption>"
                         f"{'&#10003; ' if done else ''}{i + 1}</figcaption></figure>")
        left = len(f.batch) - f.cursor
        self.batch.text = (f"<div class='ex-grid'>{''.join(cells)}</div>"
                           f"<div class='ex-muted'>{left} of {len(f.batch)} left; keys 1-9 label the "
                           "framed image</div>") if f.batch else ""
        info = f.info
        if info is None:
            self.report.text = "<div class='ex-muted'>Propagate: a predicted label and a confidence for every image</div>"
            return
        acc = info["estimated_accuracy"]
        curve = " ".join(f"{n}:{a:.0%}" for n, a, _ in f.curve)
        self.report.text = (
            f"<div>estimated accuracy <b>{'-' if acc is None else f'{acc:.1%}'}</b> "
            f"({info['labels']} labels, {info['accepted']} accepted); "
            f"{info['sure']:,} sure (expected {info['sure_precision']:.0%} right; confidence "
            f"&ge; {info['threshold']})</div>"
            f"<div class='ex-muted' title='labels: estimated accuracy'>curve {curve}</div>")


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (as the view's background hands it on)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - shown on the page by the caller
        return exc
