"""The app's search box and quality-flag filter, and the cluster names of the legend.

Pure functions first (numpy/pandas in, numpy/dicts out), then :class:`Finder`, the Bokeh
widgets of one session: a thin layer that calls them and hands the result to the session's
:class:`explorer.app.state.AppState`.

* **search by words** ("a red dress"): search by concept of :mod:`explorer.curation.search` over the
  build's ``NAME.concepts.npz`` (loaded once per process, shared by every session through
  the :class:`explorer.app.project.Project`); the sentence model and the class-name vectors
  are loaded once per process on the first query, off the event loop ("working...").
* **more like this**: the nearest rows of the one selected image in the stored embeddings
  (:meth:`Project.nearest`, the index the app's neighbours use).
* the results become the session's selection (so the map, the table and the grid show
  them), and a ranked grid with their scores is shown under the map.
* **quality flags**: the flags set in the CSV (blurry, dark, ...) with their counts; hide the
  flagged images, or show only them. The map, the legend, the label MultiSelect and the
  selection then cover just the rows shown (:meth:`AppState.set_row_filter`), so choosing
  labels in the MultiSelect selects only shown rows.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from explorer.app.html import esc
from explorer.stages.quality import FLAG_NAMES

__all__ = [
    "FLAG_MODES", "SEARCH_TOPS", "flag_counts", "flag_keep", "cluster_names", "group_text",
    "top_rows", "SearchIndex", "search_index", "Finder",
]  # fmt: skip

#: what the flag filter does with the images that carry a chosen flag
FLAG_MODES: tuple[str, ...] = ("hide", "only")
#: how many results a search shows (the first is the default)
SEARCH_TOPS: tuple[int, ...] = (40, 10, 20, 100, 500)


# --------------------------------------------------------------------------- pure functions
def _flag_matrix(table: pd.DataFrame, flags: Sequence[str]) -> np.ndarray:
    return np.column_stack([
        pd.to_numeric(table[f], errors="coerce").fillna(0).to_numpy() != 0 for f in flags
    ]) if flags else np.zeros((len(table), 0), dtype=bool)


def flag_counts(table: pd.DataFrame, rows: np.ndarray | None = None) -> dict[str, int]:
    """Images per quality flag (:data:`explorer.stages.quality.FLAG_NAMES` order) among ``rows``
    (a bool mask; default all), only the flags that are set on at least one of them."""
    present = [f for f in FLAG_NAMES if f in table.columns]
    m = _flag_matrix(table, present)
    if rows is not None:
        m = m[np.asarray(rows, dtype=bool)]
    counts = m.sum(axis=0)
    return {f: int(c) for f, c in zip(present, counts) if c}


def flag_keep(table: pd.DataFrame, flags: Iterable[str], mode: str = "hide") -> np.ndarray | None:
    """The rows the flag filter shows: ``mode="hide"`` those with none of ``flags`` set,
    ``"only"`` those with at least one; ``None`` (no filter) when ``flags`` is empty.
    Raises ``ValueError`` naming an unknown flag or mode."""
    flags = list(dict.fromkeys(str(f) for f in flags))
    if mode not in FLAG_MODES:
        raise ValueError(f"mode must be one of {FLAG_MODES}, got {mode!r}")
    unknown = [f for f in flags if f not in FLAG_NAMES]
    if unknown:
        raise ValueError(f"unknown quality flag(s) {unknown!r}; known: {', '.join(FLAG_NAMES)}")
    if not flags:
        return None
    missing = [f for f in flags if f not in table.columns]
    if missing:
        raise ValueError(f"the table has no column {missing[0]!r} (built before quality flags)")
    flagged = _flag_matrix(table, flags).any(axis=1)
    return ~flagged if mode == "hide" else flagged


def cluster_names(clusters: np.ndarray, names: pd.Series | np.ndarray) -> dict[str, str]:
    """Cluster value (string) -> its ``cluster_name`` (the first non-empty one of its rows;
    the build gives every row of a cluster the same name)."""
    df = pd.DataFrame({"c": np.asarray(clusters, dtype=object),
                       "n": pd.Series(names, dtype=object).fillna("").astype(str).to_numpy()})
    df = df[df["n"] != ""].drop_duplicates("c")
    return dict(zip(df["c"].tolist(), df["n"].tolist()))


def group_text(value: str, text: str, names: dict[str, str], muted: str) -> str:
    """How a colour group is listed in the legend and the MultiSelect: ``"3: dress, gown"``
    when the group has a name (``text`` as it is otherwise, e.g. ``"noise (-1)"``)."""
    name = names.get(value)
    if not name or value == muted:
        return text
    return f"{value}: {name}"


def top_rows(scores: np.ndarray, allowed: np.ndarray | None, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best-scoring rows among ``allowed`` (bool mask; None = all), best first
    (ties: lower row first): ``(rows, scores)``."""
    from explorer.curation.search import rank

    s = np.asarray(scores, dtype=np.float64)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    rows = rank(s, top)
    rows = rows[np.isfinite(s[rows])]
    return rows, s[rows]


# --------------------------------------------------------------------------- shared data
_model_lock = threading.Lock()
_model: tuple[Any, np.ndarray] | None = None


_encode_lock = threading.Lock()


@contextlib.contextmanager
def _one_torch_thread():
    """Torch on one thread while a query is encoded (one query at a time; the setting is
    process-wide and restored after). A one-line query is fastest on one thread: with two
    OpenMP threads on a busy 2-core machine it took 1.3 s instead of 0.04 s (bench/finder.py)."""
    import torch

    with _encode_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def text_model() -> tuple[Any, np.ndarray]:
    """(the bundled MiniLM encoder, the ImageNet class-name vectors), loaded once per
    process (slow the first time: call it off the event loop)."""
    global _model
    with _model_lock:
        if _model is None:
            from explorer.stages import concepts as C
            from explorer.curation.search import class_vectors

            _model = (C.text_encoder(), class_vectors())
        return _model


class SearchIndex:
    """What search needs of one project, shared by every session of the process."""

    def __init__(self, project: Any) -> None:
        self.project = project
        self._lock = threading.Lock()
        self._concepts: tuple[np.ndarray, np.ndarray] | None = None
        self.concepts_path = project.build.concepts_path if project.build is not None else None
        #: why search by words is not available (None: it is, as far as is known before loading)
        self.words_problem: str | None = None
        if self.concepts_path is None:
            self.words_problem = "search by words is unavailable: the table was not read from a CSV"
        elif not self.concepts_path.is_file():
            self.words_problem = (
                f"search by words is unavailable: there is no {self.concepts_path.name} beside the CSV "
                "(a build with the CNN features writes it; run explorer search NAME.csv \"words\" once "
                "to make it from NAME.features.npy)"
            )

    def concepts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(idx, p)`` top ImageNet classes per row (read once; raises ``ValueError``)."""
        from explorer.stages import concepts as C

        if self.words_problem:
            raise ValueError(self.words_problem)
        with self._lock:
            if self._concepts is None:
                idx, p = C.load_concepts(self.concepts_path)
                if len(idx) != self.project.n_rows:
                    self.words_problem = (
                        f"search by words is unavailable: {self.concepts_path.name} has {len(idx):,} rows, "
                        f"the CSV {self.project.n_rows:,}; rebuild to bring them in step"
                    )
                    raise ValueError(self.words_problem)
                idx.setflags(write=False)
                p.setflags(write=False)
                self._concepts = (idx, p)
            return self._concepts

    def words(self, query: str, allowed: np.ndarray | None, top: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(rows, scores, classes read)`` of the ``top`` rows for ``query`` among ``allowed``
        (thread-safe; slow the first time in a process)."""
        from explorer.curation.search import query_scores

        query = str(query).strip()
        if not query:
            raise ValueError("type some words to search for")
        idx, p = self.concepts()
        encoder, class_vecs = text_model()
        with _one_torch_thread():
            scores, read_as = query_scores(query, idx, p, class_vecs, encoder)
        rows, s = top_rows(scores, allowed, top)
        return rows, s, read_as

    def like(self, row: int, allowed: np.ndarray | None, top: int) -> tuple[np.ndarray, np.ndarray]:
        """The image ``row`` then its ``top - 1`` nearest rows among ``allowed`` by cosine
        similarity of the stored embeddings: ``(rows, similarities)``."""
        if self.project.features is None:
            raise ValueError(f"more like this is unavailable: {self.project.features_problem}")
        n_hidden = 0 if allowed is None else int(self.project.n_rows - allowed.sum())
        idx, dist = self.project.nearest(int(row), k=max(1, top - 1 + n_hidden))
        keep = np.ones(len(idx), bool) if allowed is None else allowed[idx]
        idx, dist = idx[keep][: top - 1], dist[keep][: top - 1]
        return np.concatenate([[int(row)], idx]).astype(np.int64), np.concatenate([[1.0], 1.0 - dist])


def search_index(project: Any) -> SearchIndex:
    """The project's :class:`SearchIndex` (one per process)."""
    return project.cached("finder.search_index", lambda: SearchIndex(project))


def project_cluster_names(project: Any) -> dict[str, str]:
    """Cluster value -> name of a project's CSV (computed once per process)."""

    def make() -> dict[str, str]:
        if "cluster_name" not in project.table.columns or "cluster" not in project.table.columns:
            return {}
        return cluster_names(project.labels("cluster"), project.table["cluster_name"])

    return project.cached("finder.cluster_names", make)


# --------------------------------------------------------------------------- widgets

class Finder:
    """Search box, "more like this", ranked results and the flag filter of one session.

    ``view`` is the session's :class:`explorer.app.view.AppView` (its state, its
    ``_background`` runner and thumbnail URLs are used). Widgets: ``search_box``,
    ``search_go``, ``search_top``, ``more_like_this``, ``search_clear``, ``search_note``,
    ``search_results`` (under the map), ``flag_mode``, ``flag_filter``, ``flag_note``;
    :attr:`panel` is the "Find" tab's content.
    """

    #: its tab's name in the sidebar
    title = "Find"

    def __init__(self, view: Any, css: list[Any], width: int, results_width: int | None = None) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import Button, CheckboxGroup, Div, RadioButtonGroup, Select, TextInput

        self.view = view
        self.state = st = view.state
        self.index = search_index(st.project)
        self.names = project_cluster_names(st.project)
        #: the last results: (rows, scores, what was searched) or None
        self.results: tuple[np.ndarray, np.ndarray, str] | None = None
        half = (width - 10) // 2
        self.search_box = TextInput(name="search_box", title="Search by words (Enter)",
                                    placeholder="e.g. a red dress", width=width)
        self.search_go = Button(name="search_go", label="Search", button_type="primary", width=half)
        self.search_top = Select(name="search_top", title="", value=str(SEARCH_TOPS[0]), width=half,
                                 options=[(str(k), f"top {k}") for k in SEARCH_TOPS])
        self.more_like = Button(name="more_like_this", label="More like the selected image", width=width)
        self.search_clear = Button(name="search_clear", label="Clear results", width=width)
        self.search_note = Div(name="search_note", text="", stylesheets=css, width=width)
        self.results_div = Div(name="search_results", text="", stylesheets=css,
                               **({"width": results_width} if results_width else {"sizing_mode": "stretch_width"}))
        counts = st.project.cached("finder.flag_counts", lambda: flag_counts(st.project.table, st.project.valid))
        #: the flag filter in force: (flags, mode)
        self.applied: tuple[tuple[str, ...], str] = ((), "hide")
        self.flag_values = list(counts)
        self.flag_mode = RadioButtonGroup(name="flag_mode", labels=["hide flagged", "show only flagged"],
                                          active=0, width=width)
        self.flag_filter = CheckboxGroup(name="flag_filter", labels=[f"{f.replace('_', ' ')} ({c:,})"
                                         for f, c in counts.items()], active=[], width=width)  # fmt: skip
        self.flag_note = Div(name="flag_note", stylesheets=css, width=width, text=(
            "<div class='ex-muted'>Quality flags (of the build): tick flags to filter the map</div>"
            if counts else "<div class='ex-muted'>no image carries a quality flag in this CSV</div>"))
        self.flag_mode.visible = self.flag_filter.visible = bool(counts)
        self.panel = column(
            self.search_box, row(self.search_go, self.search_top), self.more_like, self.search_clear,
            self.search_note, self.flag_note, self.flag_mode, self.flag_filter,
            name="find_panel", width=width,
        )  # fmt: skip
        self.search_box.on_change("value", lambda a, o, n: self.search_words())
        self.search_go.on_click(self.search_words)
        self.more_like.on_click(self.search_like)
        self.search_clear.on_click(self.clear)
        self.flag_mode.on_change("active", lambda a, o, n: self._on_flags())
        self.flag_filter.on_change("active", lambda a, o, n: self._on_flags())
        view.reset.on_click(self._on_reset)  # after the view's own reset
        st.subscribe(self.render)
        self.render(frozenset({"selection", "map"}))

    # ------------------------------------------------------------------ legend / MultiSelect
    def group_text(self, value: str, text: str) -> str:
        """The legend's / MultiSelect's text of a colour group (cluster names added)."""
        if self.state.label_column != "cluster":
            return text
        return group_text(value, text, self.names, self.state.muted_value())

    def label_options(self) -> list[tuple[str, str]]:
        """The label MultiSelect's options with cluster names: ``("3", "3: dress, gown  (120)")``."""
        st = self.state
        if st.label_column != "cluster" or not self.names:
            return st.label_options()
        counts = st.label_counts()
        return [(v, f"{self.group_text(v, st.label_text(v))}  ({counts.get(v, 0):,})")
                for v, _ in st.label_options()]

    # ------------------------------------------------------------------ search
    def opened(self) -> None:
        """Its tab was opened: load the text model in the background."""
        self.warm()

    def warm(self) -> None:
        """Load the text model and the concepts in the pool (once per process) when the Find
        tab is opened in a served app, so the first query does not wait for them."""
        if self.view.served and _model is None and not self.index.words_problem:
            from explorer.app import work

            index = self.index

            def load() -> None:
                try:
                    index.concepts()
                    text_model()
                except Exception:  # noqa: BLE001 - the query says what is wrong
                    pass

            work.threads().submit(load)

    def _top(self) -> int:
        try:
            return int(self.search_top.value)
        except (TypeError, ValueError):
            return SEARCH_TOPS[0]

    def _allowed(self) -> np.ndarray | None:
        st = self.state
        return None if st.valid is st.project.valid and st.project.all_valid else st.valid

    def search_words(self, query: str | None = None) -> None:
        """Search by words (the box's text when ``query`` is None); the results are selected."""
        st = self.state
        query = (self.search_box.value if query is None else query) or ""
        query = query.strip()
        if not query:
            return
        if self.index.words_problem:
            st.refuse(self.index.words_problem)
            return
        allowed, top, index = self._allowed(), self._top(), self.index

        def finish(found: Any) -> None:
            if isinstance(found, Exception):
                self._render_note()
                st.refuse(f"search failed: {found}")
                return
            rows, scores, read_as = found
            self.show(rows, scores, f"“{query}” (read as: {', '.join(read_as)})")

        self.view.background(f"searching for “{query}”", lambda: index.words(query, allowed, top),
                              finish, drop_if_moved=False)

    def search_like(self) -> None:
        """"More like this": the selected image and its nearest images become the selection."""
        st = self.state
        if len(st.selection) != 1:
            st.refuse("select one image (click it on the map) to find more like it")
            return
        row = int(st.selection[0])
        name = st.project.names_of([row])[0]
        allowed, top, index = self._allowed(), self._top(), self.index

        def finish(found: Any) -> None:
            if isinstance(found, Exception):
                st.refuse(f"search failed: {found}")
                return
            self.show(*found, f"images like {name}")

        self.view.background(f"finding images like {name}", lambda: index.like(row, allowed, top),
                              finish, drop_if_moved=False)

    def show(self, rows: np.ndarray, scores: np.ndarray, what: str) -> None:
        """Make ``rows`` (ranked) the session's selection and show them with their scores."""
        st = self.state
        self.results = (np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=float), what)
        st.select(self.results[0])
        st.say(f"{len(rows):,} result(s) for {what}, selected on the map" if len(rows)
                else f"nothing found for {what}")
        st.emit("message")
        self.render(frozenset({"selection"}))

    def clear(self) -> None:
        self.results = None
        self.render(frozenset({"selection"}))

    # ------------------------------------------------------------------ flags
    def chosen_flags(self) -> list[str]:
        return [self.flag_values[i] for i in self.flag_filter.active if 0 <= i < len(self.flag_values)]

    def set_flags(self, flags: Iterable[str], mode: str = "hide") -> bool:
        """Filter the map by quality flags (see :func:`flag_keep`); the widgets follow."""
        flags = tuple(flags)
        keep = flag_keep(self.state.project.table, flags, mode)
        before, self.applied = self.applied, (flags, mode)
        if keep is None and self.state.row_filter is None:
            ok = True
        else:
            shown = "hiding" if mode == "hide" else "only"
            why = f"{shown} {', '.join(f.replace('_', ' ') for f in flags)}" if flags else "quality filter off"
            ok = self.state.set_row_filter(keep, why)
        if not ok:
            self.applied = before
        self._render_flags()
        return ok

    _syncing = False

    def _on_flags(self) -> None:
        if self._syncing:
            return
        self.set_flags(self.chosen_flags(), FLAG_MODES[int(self.flag_mode.active or 0)])

    def _on_reset(self) -> None:
        self.results = None
        self.set_flags([], "hide")
        self.render(frozenset({"selection"}))

    # ------------------------------------------------------------------ rendering
    def render(self, what: frozenset[str]) -> None:
        if "selection" in what or "map" in what:
            st = self.state
            self.more_like.disabled = not (len(st.selection) == 1 and st.has_features)
            self._render_results()
            self._render_note()
        if "map" in what or "columns" in what:
            self._render_flags()

    def _render_flags(self) -> None:
        """The boxes show the filter in force (also after a refusal); off while drilled in."""
        self.flag_filter.disabled = self.flag_mode.disabled = bool(self.state.drill)
        flags, mode = self.applied
        active = [self.flag_values.index(f) for f in flags if f in self.flag_values]
        self._syncing = True
        try:
            if list(self.flag_filter.active) != active:
                self.flag_filter.active = active
            if self.flag_mode.active != FLAG_MODES.index(mode):
                self.flag_mode.active = FLAG_MODES.index(mode)
        finally:
            self._syncing = False

    def _render_note(self) -> None:
        st = self.state
        notes = []
        if self.index.words_problem:
            notes.append(f"<div class='ex-msg ex-warning'>{esc(self.index.words_problem)}</div>")
        else:
            notes.append("<div class='ex-muted'>search by concept: the words are matched to the "
                         "1,000 ImageNet classes the images were seen as; there is no class for a "
                         "person, a face, a colour alone or an action</div>")
        if not st.has_features:
            notes.append(f"<div class='ex-muted'>more like this is off: {esc(st.features_problem)}</div>")
        self.search_note.text = "".join(notes)

    def _render_results(self) -> None:
        if self.results is None:
            self.results_div.text = ""
            self.search_clear.disabled = True
            return
        self.search_clear.disabled = False
        rows, scores, what = self.results
        st = self.state
        names = st.project.names_of(rows)
        cells = []
        for rank_, (r, s, name) in enumerate(zip(rows.tolist(), scores.tolist(), names), 1):
            cells.append(
                f"<figure class='ex-cell ex-result'><img src='{esc(self.view.thumb(r))}' alt='' "
                f"loading='lazy' title='{esc(name)}'><figcaption><span class='ex-name'>{esc(name)}</span>"
                f"<span class='ex-dist'>#{rank_} &middot; score {s:.3f}</span></figcaption></figure>"
            )
        same = np.array_equal(np.unique(rows[st.valid[rows]]), st.selection)
        head = (f"<div class='ex-pageinfo'>{len(rows):,} result(s) for {esc(what)}, best first"
                + ("" if same else " &middot; <i>no longer the selection</i>") + "</div>")
        body = f"<div class='ex-grid ex-results'>{''.join(cells)}</div>" if cells else \
            "<div class='ex-muted'>no results</div>"
        self.results_div.text = head + body
