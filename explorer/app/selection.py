"""Selection, label filter and colours of one session (mixed into :class:`AppState`).

Vocabulary
----------
row          position 0..n-1 in the table read from the CSV
selection    the rows the person currently has selected (sorted, unique)
scope        the rows that label changes may touch while "only change selected" is on:
             the selection at the moment the toggle was switched on, or the last lasso
colour column the column the map is coloured by and the MultiSelect filters on
             (``cluster`` by default, or ``label`` / ``duplicate_group`` / a metadata
             column); its values are called *groups* below, as strings
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import pandas as pd

from explorer.app.session import SessionFields
from explorer.stages.images import natural_key

#: columns a person can colour the map by / filter the MultiSelect on
LABEL_COLUMNS: tuple[str, ...] = ("cluster", "label", "duplicate_group")

#: the value of each colour column that means "no group" (drawn muted)
MUTED_VALUES: dict[str, str] = {"cluster": "-1", "label": "", "duplicate_group": "-1"}

#: categorical palette (Category20 order: strong colours first, then their light pairs)
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#637939",
)  # fmt: skip
MUTED_COLOR = "#9e9e9e"
MUTED_ALPHA = 0.25
POINT_ALPHA = 0.8

#: aspects a subscriber may be told about
ASPECTS = frozenset(
    {"selection", "filter", "only_selected", "label_column", "point_size", "message",
     "labels", "map", "suggestions", "neighbours", "overview", "columns", "busy"}
)

#: the virtual colour column of a drill-down map (sub-cluster ids like "3.1")
SUBCLUSTER = "subcluster"
#: extra (metadata) columns with at most this many distinct values can colour the map
MAX_CATEGORIES = 200
#: the MultiSelect lists at most this many groups (most populous first); the rest are
#: reachable by lasso, and the legend says how many more there are (review M7)
MAX_OPTIONS = 500


def sort_labels(values: Iterable[str]) -> list[str]:
    """Labels in display order: numerically if all are integers, else naturally."""
    vals = list(dict.fromkeys(values))
    try:
        return sorted(vals, key=lambda v: int(v))
    except ValueError:
        return sorted(vals, key=natural_key)


#: how a new selection combines with the current one (Bokeh's select tools' modes)
SELECT_MODES: tuple[str, ...] = ("replace", "append", "intersect", "subtract", "toggle")


def combine_selection(current: np.ndarray, rows: np.ndarray, mode: str = "replace") -> np.ndarray:
    """The selection after selecting ``rows`` (sorted unique row numbers) with ``mode``:
    replace, append (union), intersect, subtract (current minus rows) or toggle
    (symmetric difference). Raises ``ValueError`` naming an unknown mode."""
    if mode == "replace":
        return rows
    ops = {"append": np.union1d, "intersect": np.intersect1d, "subtract": np.setdiff1d, "toggle": np.setxor1d}
    if mode not in ops:
        raise ValueError(f"mode must be one of {list(SELECT_MODES)}, got {mode!r}")
    return ops[mode](current, rows).astype(np.int64)


def default_point_size(n: int) -> float:
    """Marker size in screen pixels that suits ``n`` points: 10 for a few dozen, 4 for 100k+."""
    return float(np.clip(round(14 - 2 * np.log10(max(n, 1))), 4, 10))


def color_codes_of(labels: np.ndarray, muted: str, colours: dict[str, str] | None = None
                   ) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """(code per row, colour per code, alpha per code, value per code) for label strings.

    ``colours`` (value -> colour, in display order) fixes the colours and the order of its
    values (a binned continuous column, :class:`ColourColumn`); other values follow, sorted,
    with the categorical palette."""
    uniq, codes = np.unique(labels.astype(str), return_inverse=True) if len(labels) else (np.zeros(0, str), np.zeros(0, int))
    colours = colours or {}
    present = set(uniq.tolist())
    values = [v for v in colours if v in present] + sort_labels(v for v in uniq.tolist() if v not in colours)
    order = {v: i for i, v in enumerate(values)}
    remap = np.asarray([order[v] for v in uniq.tolist()], dtype=np.int32)
    codes = remap[codes] if len(codes) else np.zeros(0, dtype=np.int32)
    palette, alphas, i = [], [], 0
    for v in values:
        if v == muted:
            palette.append(MUTED_COLOR)
            alphas.append(MUTED_ALPHA)
        elif v in colours:
            palette.append(colours[v])
            alphas.append(POINT_ALPHA)
        else:
            palette.append(PALETTE[i % len(PALETTE)])
            alphas.append(POINT_ALPHA)
            i += 1
    codes = codes.astype(np.int32)
    codes.setflags(write=False)
    return codes, palette, np.asarray(alphas, dtype=float), values


class ColourColumn(NamedTuple):
    """A colour column a session makes (not in the table): the labelling panel's
    "prediction" and "confidence", the clusters of the layout with the person's labels.
    Set with :meth:`SelectionModel.set_colour_column`; it then colours the map, fills the
    legend and the MultiSelect like any column, on the one colour path (:meth:`color_codes`)."""

    #: the value (string) of every row
    labels: np.ndarray
    #: value -> colour in display order (a binned continuous palette); None: categorical
    colours: dict[str, str] | None = None
    #: the value drawn grey and faint ("no group")
    muted: str = ""
    #: how that value is shown to a person
    muted_text: str = "(none)"


class SelectionModel(SessionFields):
    """Selection / filter / colour methods of :class:`explorer.app.state.AppState`
    (its attributes: :class:`explorer.app.session.SessionFields`)."""

    # ------------------------------------------------------------------ observers
    def subscribe(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback(aspects)`` after every change (aspects: see :data:`ASPECTS`)."""
        self._subscribers.append(callback)

    def emit(self, *aspects: str) -> None:
        """Tell every subscriber that ``aspects`` changed (views re-render them)."""
        what = frozenset(aspects)
        for cb in list(self._subscribers):
            cb(what)

    def say(self, text: str, level: str = "info") -> None:
        """Set the page's message (shown at the next ``emit("message")``)."""
        self.message = (level, text)

    def refuse(self, text: str) -> None:
        """Show ``text`` as an error now (a request that could not be done)."""
        self.say(text, "error")
        self.emit("message")

    # ------------------------------------------------------------------ labels
    def _check_label_column(self, col: str) -> None:
        if col not in self.label_columns():
            raise ValueError(f"label_column must be one of {self.label_columns()}, got {col!r}")

    def muted_value(self, column: str | None = None) -> str:
        """The value of ``column`` that means "no group" (drawn grey)."""
        column = column or self.label_column
        if column in self.colour_columns:
            return self.colour_columns[column].muted
        return MUTED_VALUES.get(column, "")

    def set_colour_column(self, name: str, column: ColourColumn | None, announce: bool = True) -> None:
        """Offer (or with ``None`` withdraw) a session-made colour column ``name``; when the
        map is coloured by it, it is recoloured now. ``announce=False``: tell no view (a
        panel being built, before the views render). Raises ``ValueError`` for a column of
        the wrong length or a name of the table's own colour columns."""
        if name in LABEL_COLUMNS or name == SUBCLUSTER:
            raise ValueError(f"{name!r} is one of the table's colour columns; choose another name")
        if column is not None and len(column.labels) != self.n_rows:
            raise ValueError(f"colour column {name!r} has {len(column.labels)} values for {self.n_rows} rows")
        if column is None:
            self.colour_columns.pop(name, None)
        else:
            self.colour_columns[name] = column
        self.invalidate_labels(name)
        aspects = ["columns"]
        if self.label_column == name:
            if column is None:
                self.label_column = self._initial["label_column"]
            self.label_filter = self.present_labels()
            aspects += ["label_column", "filter"]
        if announce:
            self.emit(*aspects)

    @staticmethod
    def _check_point_size(size: float) -> None:
        try:
            ok = np.isfinite(float(size)) and float(size) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"point_size must be a positive number, got {size!r}")

    def _shared_column(self, column: str) -> bool:
        """True when ``column``'s labels are the project's (shared, not session-made)."""
        return (column not in ("label", SUBCLUSTER) and column not in self.colour_columns
                and self._table is None and column in self.project.table.columns)

    def labels(self, column: str | None = None) -> np.ndarray:
        """Every row's value (string) in ``column`` (default: the current colour column)."""
        column = column or self.label_column
        self._check_label_column(column)
        if self._shared_column(column):
            return self.project.labels(column)
        if column not in self._label_cache:
            from explorer.app.project import label_strings

            if column in self.colour_columns:
                arr = np.asarray(self.colour_columns[column].labels, dtype=object)
            elif column == "label" and self.book is not None:
                arr = np.asarray(self.book.labels_for(self.keys), dtype=object)
            elif column == SUBCLUSTER:
                arr = self.subcluster_labels()
            elif column in self.table.columns:
                arr = label_strings(self.table[column])
            else:
                arr = np.full(self.n_rows, MUTED_VALUES[column], dtype=object)
            self._label_cache[column] = arr
        return self._label_cache[column]

    def labels_of(self, rows: Iterable[int], column: str = "label") -> list[str]:
        """The values of a few ``rows`` in ``column`` without building the whole column."""
        rows = [int(i) for i in rows]
        if column == "label" and self.book is not None and column not in self._label_cache:
            keys = self.keys
            return self.book.labels_for([keys[i] for i in rows])
        lab = self.labels(column)
        return [lab[i] for i in rows]

    def invalidate_labels(self, column: str | None = None) -> None:
        """Forget derived label data (call after the table's labels change)."""
        if column is None:
            self._label_cache.clear()
            self._derived.clear()
        else:
            self._label_cache.pop(column, None)
            for key in [k for k in self._derived if k[1] == column]:
                del self._derived[key]

    def cached(self, kind: str, make: Callable[[], Any]) -> Any:
        """``make()`` for the current colour column, computed once: per process for the
        project's own columns (no drill-down, no row filter), else per session."""
        col = self.label_column
        if self._shared_column(col) and self.valid is self.project.valid:  # no drill-down, no row filter
            return self.project.cached(f"{kind}\0{col}", make)
        key = (kind, col)
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def label_values(self) -> list[str]:
        """Distinct values of the drawable rows, in display order."""
        return list(self.label_counts())

    def label_counts(self) -> dict[str, int]:
        """Number of drawable rows per value, in display order."""

        def make() -> dict[str, int]:
            codes, _, _, values = self.color_codes()
            counts = np.bincount(codes[self.valid], minlength=len(values)) if len(codes) else []
            return {v: int(c) for v, c in zip(values, counts) if c}

        return dict(self.cached("counts", make))

    def label_text(self, value: str) -> str:
        """How a value is shown to a person."""
        if value == self.muted_value():
            if self.label_column in self.colour_columns:
                return self.colour_columns[self.label_column].muted_text
            return {"cluster": "noise (-1)", "label": "(no label)", "duplicate_group": "unique (-1)"}.get(
                self.label_column, "(none)"
            )
        return value

    def label_options(self) -> list[tuple[str, str]]:
        """(value, text with count) pairs for the MultiSelect: at most :data:`MAX_OPTIONS`
        (the most populous, in display order) plus every value currently filtered on."""
        counts = self.label_counts()
        keep = set(counts)
        if len(counts) > MAX_OPTIONS:
            top = sorted(counts, key=lambda v: -counts[v])[:MAX_OPTIONS]
            keep = set(top) | set(self.label_filter)
        return [(v, f"{self.label_text(v)}  ({c:,})") for v, c in counts.items() if v in keep]

    def color_codes(self) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        """Colour of every row as a code into small per-value tables.

        Returns ``(code per row, colour per code, alpha per code, value per code)``.
        Values get palette colours in display order, cycling; the "no group" value
        (cluster -1, empty label, duplicate_group -1) is grey and faint."""
        virtual = self.colour_columns.get(self.label_column)
        colours = virtual.colours if virtual is not None else None
        return self.cached("codes", lambda: color_codes_of(self.labels(), self.muted_value(), colours))

    def colors(self) -> tuple[np.ndarray, np.ndarray]:
        """(colour hex, alpha) per row for the current colour column."""
        codes, palette, alphas, _ = self.color_codes()
        if not len(codes):
            return np.zeros(0, dtype=object), np.zeros(0)
        return np.asarray(palette, dtype=object)[codes], alphas[codes]

    def legend(self) -> list[tuple[str, str, str, int]]:
        """(value, text, colour, count) per value of the drawable rows, in display order."""
        _, palette, _, values = self.color_codes()
        color_of = dict(zip(values, palette))
        return [(v, self.label_text(v), color_of[v], c) for v, c in self.label_counts().items()]

    # ------------------------------------------------------------------ selection
    def _as_rows(self, rows: Iterable[int]) -> np.ndarray:
        arr = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
                arr = arr.astype(np.int64)
            else:
                raise ValueError(f"rows must be integers, got dtype {arr.dtype}")
        arr = np.unique(arr.astype(np.int64))
        bad = arr[(arr < 0) | (arr >= self.n_rows)]
        if bad.size:
            raise ValueError(f"row {int(bad[0])} out of range for {self.n_rows} rows")
        return arr[self.valid[arr]]

    def present_labels(self, rows: np.ndarray | None = None) -> tuple[str, ...]:
        rows = self.selection if rows is None else rows
        if len(rows) == 0:
            return ()
        codes, _, _, values = self.color_codes()
        return tuple(values[c] for c in np.unique(codes[rows]))

    def select(self, rows: Iterable[int], mode: str = "replace") -> None:
        """A person selected ``rows`` on the map (lasso, box, click): combined with the
        selection by ``mode`` (:data:`SELECT_MODES`, as the select tools do: "append" with
        Shift, "toggle" for a Shift-click; see :func:`combine_selection`), they become the
        selection and the scope, and the label filter shows the values present in them.

        With :attr:`defer_neighbours` (the served app) a single image's neighbours are
        left to the caller (a background search); otherwise they are found here."""
        sel = combine_selection(self.selection, self._as_rows(rows), mode)
        self.generation.bump()
        self.selection = sel
        self.scope = sel
        self.label_filter = self.present_labels(sel)
        self.neighbours = None if self.defer_neighbours else self.neighbours_for(sel)
        self.say(f"{len(sel):,} selected" if len(sel) else "nothing selected")
        self.emit("selection", "filter", "message", "neighbours")

    def set_label_filter(self, values: Iterable[str]) -> None:
        """A person chose ``values`` in the MultiSelect: select their rows.

        With "only change selected" on, only rows of the scope are (de)selected, so
        removing a value and adding it back restores exactly the rows it had."""
        values = tuple(str(v) for v in values)
        codes, _, _, known_values = self.color_codes()
        counts = self.label_counts()
        unknown = [v for v in values if v not in counts]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown!r} in column {self.label_column!r}")
        values = tuple(sort_labels(values))
        if values == self.label_filter:
            return
        code_of = {v: i for i, v in enumerate(known_values)}
        wanted = np.zeros(len(known_values), dtype=bool)
        wanted[[code_of[v] for v in values]] = True
        self.generation.bump()
        if self.only_selected:
            base = self.scope
            sel = base[wanted[codes[base]]] if len(base) else base
        else:
            sel = np.flatnonzero(wanted[codes] & self.valid).astype(np.int64) if len(codes) else np.zeros(0, np.int64)
            self.scope = sel
        self.label_filter = values
        self.selection = sel
        self.neighbours = None
        self.say(f"{len(sel):,} selected")
        self.emit("selection", "filter", "message")

    def clear_label_filter(self) -> None:
        """Empty the MultiSelect: nothing is selected afterwards (the scope of
        "only change selected" is kept, so values can be added back)."""
        self.generation.bump()
        self.label_filter = ()
        self.selection = np.zeros(0, dtype=np.int64)
        self.neighbours = None
        if not self.only_selected:
            self.scope = self.selection
        self.say("label filter cleared; nothing selected")
        self.emit("selection", "filter", "message")

    def set_only_selected(self, flag: bool) -> None:
        """Turn "only change selected" on (the current selection becomes the scope) or off."""
        flag = bool(flag)
        if flag == self.only_selected:
            return
        self.only_selected = flag
        self.scope = self.selection
        if flag:
            self.say(f"label changes now only touch the {len(self.scope):,} selected images")
        else:
            self.say("label changes select every image with the label")
        self.emit("only_selected", "message")

    def set_label_column(self, column: str) -> None:
        """Colour the map by ``column`` and filter on it; the selection stays."""
        self._check_label_column(column)
        if column == self.label_column:
            return
        self.label_column = column
        self.label_filter = self.present_labels()
        self.say(f"colouring by {column}")
        self.emit("label_column", "filter", "message")

    def set_point_size(self, size: float) -> None:
        self._check_point_size(size)
        self.point_size = float(size)
        self.emit("point_size")

    def reset(self) -> None:
        """Back to the state right after loading (labels are kept: undo takes them back).

        Only what changed is re-rendered: the map's points are re-sent only when a
        drill-down had replaced them (review M7)."""
        self.generation.bump()
        aspects = {"selection", "filter", "only_selected", "message", "neighbours"}
        if self.drill:
            self.drill.clear()
            self.valid = self._base_valid
            self._base_valid = None
            self.invalidate_labels()
            aspects |= {"map", "label_column", "columns"}
        self.neighbours = None
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = self.selection
        self.label_filter = ()
        self.only_selected = False
        if self.label_column != self._initial["label_column"]:
            self.label_column = self._initial["label_column"]
            aspects.add("label_column")
        if self.point_size != self._initial["point_size"]:
            self.point_size = self._initial["point_size"]
            aspects.add("point_size")
        self.say("reset: nothing selected")
        self.emit(*aspects)

    def selected_table(self) -> pd.DataFrame:
        """The selected rows, every column (x and y included), labels as they are now."""
        return self.labelled(self.selection)
