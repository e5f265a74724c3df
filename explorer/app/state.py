"""The explorer app's state: rows, selection, label filter, toggles, exports.

Plain Python (pandas/numpy only, no Bokeh import) so tests drive it directly and the
Bokeh layer (:mod:`explorer.app.view`) only wires widgets to it. One :class:`AppState`
per browser session; nothing here is module-level state.

Vocabulary
----------
row        position 0..n-1 in the table read from the CSV
selection  the rows the person currently has selected (sorted, unique)
scope      the rows that label changes may touch while "only change selected" is on:
           the selection at the moment the toggle was switched on, or the last lasso
label      the value of the *label column* of a row as a string; the label column is
           what the map is coloured by and what the label MultiSelect filters
           (``cluster`` by default, or ``label`` / ``duplicate_group``)

Views subscribe with :meth:`AppState.subscribe` and re-render from the state when told
which aspects changed (see :data:`ASPECTS`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd

from explorer.paths import image_root_from_run
from explorer.table import read_table, sidecar, write_table

#: columns a person can colour the map by / filter the label MultiSelect on
LABEL_COLUMNS: tuple[str, ...] = ("cluster", "label", "duplicate_group")

#: the value of each label column that means "no group" (drawn muted)
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
MAX_NAME_LENGTH = 120

#: aspects a subscriber may be told about
ASPECTS = frozenset(
    {"selection", "filter", "only_selected", "label_column", "point_size", "message",
     "labels", "map", "suggestions", "neighbours", "overview", "columns"}
)

#: the virtual label column of a drill-down map (sub-cluster ids like "3.1")
SUBCLUSTER = "subcluster"
#: extra (metadata) columns with at most this many distinct values can colour the map
MAX_CATEGORIES = 200

_FORBIDDEN_NAME_CHARS = set('/\\\0<>:"|?*')


class ExportError(ValueError):
    """A save request that cannot be carried out (bad name, nothing selected)."""


@dataclass
class SaveResult:
    """What :meth:`AppState.export` wrote."""

    csv: Path | None = None
    zip: Path | None = None
    rows: int = 0
    originals: int = 0
    thumbnails: int = 0
    missing: list[str] = field(default_factory=list)
    message: str = ""
    #: (download file name, URL path under the app route) for each written file
    downloads: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers
def _natural_key(s: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s)]


def sort_labels(values: Iterable[str]) -> list[str]:
    """Labels in display order: numerically if all are integers, else naturally."""
    vals = list(dict.fromkeys(values))
    try:
        return sorted(vals, key=lambda v: int(v))
    except ValueError:
        return sorted(vals, key=_natural_key)


def label_strings(series: pd.Series) -> np.ndarray:
    """A column's values as label strings ("" for missing, ints without ".0")."""
    s = series
    if pd.api.types.is_float_dtype(s):
        vals = [
            "" if not np.isfinite(v) else (str(int(v)) if float(v).is_integer() else str(v))
            for v in s.to_numpy()
        ]
        return np.asarray(vals, dtype=object)
    return s.fillna("").astype(str).to_numpy(dtype=object)


def default_point_size(n: int) -> float:
    """Marker size in screen pixels that suits ``n`` points: 10 for a few dozen, 4 for 100k+."""
    return float(np.clip(round(14 - 2 * np.log10(max(n, 1))), 4, 10))


def check_export_name(name: str) -> str:
    """Validate a file name typed by a person; return the stem (no .csv/.zip suffix).

    Raises :class:`ExportError` naming the problem for empty names, path separators,
    ``..``, NUL/control characters, characters Windows forbids, hidden names and names
    longer than 120 characters.
    """
    if not isinstance(name, str):
        raise ExportError(f"file name must be text, got {type(name).__name__}")
    stem = name.strip()
    low = stem.lower()
    for suffix in (".csv", ".zip"):
        if low.endswith(suffix):
            stem = stem[: -len(suffix)].rstrip()
            break
    if not stem:
        raise ExportError("enter a file name to save under")
    bad = sorted({c for c in stem if c in _FORBIDDEN_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ExportError(f"file name {name!r} is refused: it contains {shown}")
    if ".." in stem:
        raise ExportError(f"file name {name!r} is refused: it contains '..'")
    if stem.startswith("."):
        raise ExportError(f"file name {name!r} is refused: it starts with '.'")
    if stem.endswith("."):
        raise ExportError(f"file name {name!r} is refused: it ends with '.'")
    if len(stem) > MAX_NAME_LENGTH:
        raise ExportError(f"file name is {len(stem)} characters long; at most {MAX_NAME_LENGTH}")
    return stem


def thumb_url(value: str, route: str) -> str:
    """Browser URL of a thumbnail given the CSV's ``image`` value and the app route.

    Relative values (``static/thumbs/x.jpg``) become ``/<route>/static/thumbs/x.jpg``
    (percent-encoded); values starting with ``/``, ``http://`` or ``https://`` are kept.
    """
    if not value:
        return ""
    if value.startswith(("http://", "https://", "/")):
        return value
    rel = posixpath.normpath(value.replace("\\", "/")).lstrip("/")
    if rel.startswith(".."):
        return ""
    prefix = f"/{quote(route)}/" if route else "/"
    return prefix + quote(rel)


_PLAIN = r"^[A-Za-z0-9_.~-][A-Za-z0-9_.~/-]*$"
_PLAIN_RE = re.compile(_PLAIN)


def thumb_urls(values: pd.Series, route: str) -> np.ndarray:
    """:func:`thumb_url` for a whole column (fast path for plain relative paths)."""
    prefix = f"/{quote(route)}/" if route else "/"
    match = _PLAIN_RE.match
    out = [
        (prefix + v if match(v) and ".." not in v and "//" not in v else thumb_url(v, route))
        if isinstance(v, str)
        else ""
        for v in values.tolist()
    ]
    return np.asarray(out, dtype=object)


# --------------------------------------------------------------------------- state
class AppState:
    """Selection, label filter and toggles of one app session over one table.

    Parameters
    ----------
    table : the rows (schema of :mod:`explorer.table`); not modified
    app_dir : the app folder (thumbnails resolve relative to it, exports go to
        ``app_dir/exports``); ``None`` disables exports
    route : URL route of the app (``bokeh serve NAME`` serves it at ``/NAME``)
    image_dir : folder the ``path`` column is relative to (originals for the zip)
    csv_path : where the table came from (shown to the person)
    problems : messages about the input to show on the page
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        app_dir: str | os.PathLike | None = None,
        route: str | None = None,
        image_dir: str | os.PathLike | None = None,
        csv_path: str | os.PathLike | None = None,
        problems: Sequence[str] = (),
        label_column: str = "cluster",
        point_size: float | None = None,
    ) -> None:
        for col in ("x", "y"):
            if col not in table.columns:
                raise ValueError(f"table has no {col!r} column; columns are {list(table.columns)}")
        self.table = table.reset_index(drop=True)
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else None
        self.route = route if route is not None else (self.app_dir.name if self.app_dir else "")
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.problems: list[str] = list(problems)
        n = len(self.table)
        if point_size is None:
            point_size = default_point_size(n)
        x = pd.to_numeric(self.table["x"], errors="coerce").to_numpy(dtype=float)
        y = pd.to_numeric(self.table["y"], errors="coerce").to_numpy(dtype=float)
        #: rows that can be drawn (finite x and y)
        self.valid = np.isfinite(x) & np.isfinite(y)
        self.n_rows = n
        self._label_cache: dict[str, np.ndarray] = {}
        self._derived: dict[tuple[str, str], Any] = {}
        self._subscribers: list[Callable[[frozenset[str]], None]] = []
        self._initial = {"label_column": label_column, "point_size": float(point_size)}
        self._init_curation()
        self._check_label_column(label_column)
        self._check_point_size(point_size)
        self.label_column = label_column
        self.point_size = float(point_size)
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = np.zeros(0, dtype=np.int64)
        self.label_filter: tuple[str, ...] = ()
        self.only_selected = False
        self.message: tuple[str, str] = ("info", "")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_csv(
        cls,
        csv_path: str | os.PathLike,
        app_dir: str | os.PathLike | None = None,
        route: str | None = None,
        journal: bool = True,
    ) -> "AppState":
        """Read ``csv_path`` leniently (``read_table(strict=False)``) and its run record.

        Raises :class:`explorer.table.SchemaError` only when there is nothing to draw
        (file missing or unreadable, no x/y columns). Every other problem is listed in
        :attr:`problems`.
        """
        csv_path = Path(csv_path).resolve()
        df = read_table(csv_path, strict=False)
        problems = list(df.attrs.get("problems", []))
        image_dir, run_problem = _image_dir_from_run(csv_path)
        if run_problem:
            problems.append(run_problem)
        state = cls(
            df, app_dir=app_dir, route=route, image_dir=image_dir, csv_path=csv_path,
            problems=problems,
        )  # fmt: skip
        state.problems += state._check_images()
        if journal:
            from explorer.journal import journal_for

            state.attach_journal(journal_for(csv_path))
        state.load_features(sidecar(csv_path, "features.npy"))
        return state

    def _check_images(self) -> list[str]:
        """Messages about thumbnails that do not exist (one directory listing per folder)."""
        if self.app_dir is None or self.n_rows == 0:
            return []
        values = pd.Series(pd.unique(self.table["image"].fillna("").astype(str)))
        plain = values.str.match(_PLAIN) & ~values.str.contains("..", regex=False)
        listing: dict[str, set[str]] = {}

        def listed(folder: str) -> set[str]:
            if folder not in listing:
                try:
                    listing[folder] = set(os.listdir(self.app_dir / folder)) if folder else set(os.listdir(self.app_dir))
                except OSError:
                    listing[folder] = set()
            return listing[folder]

        missing: list[str] = []
        parts = values[plain].str.rpartition("/")
        for folder in pd.unique(parts[0]):
            names = listed(folder)
            these = parts[parts[0] == folder]
            gone = ~these[2].isin(names)
            missing += values[plain][gone.to_numpy()].tolist() if gone.any() else []
        for value in values[~plain]:
            f = self.thumb_file(value)
            if f is None:
                if not value.startswith(("http://", "https://", "/")):
                    missing.append(value or "(empty)")
            elif f.name not in listed(os.path.relpath(f.parent, self.app_dir)):
                missing.append(value)
        if not missing:
            return []
        img = self.table["image"].fillna("").astype(str)
        n_missing = int(img.isin(set(missing)).sum())
        if "(empty)" in missing:
            n_missing += int((img == "").sum())
        return [
            f"{n_missing:,} of {self.n_rows:,} thumbnail(s) not found under {self.app_dir} "
            f"(e.g. {missing[0]!r}); those images show as blanks"
        ]

    # ------------------------------------------------------------------ observers
    def subscribe(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback(aspects)`` after every change (aspects: see :data:`ASPECTS`)."""
        self._subscribers.append(callback)

    def _emit(self, *aspects: str) -> None:
        what = frozenset(aspects)
        for cb in list(self._subscribers):
            cb(what)

    def _say(self, text: str, level: str = "info") -> None:
        self.message = (level, text)

    # ------------------------------------------------------------------ labels
    def _check_label_column(self, col: str) -> None:
        if col not in self.label_columns():
            raise ValueError(f"label_column must be one of {self.label_columns()}, got {col!r}")

    def muted_value(self, column: str | None = None) -> str:
        """The value of ``column`` that means "no group" (drawn grey)."""
        return MUTED_VALUES.get(column or self.label_column, "")

    @staticmethod
    def _check_point_size(size: float) -> None:
        try:
            ok = np.isfinite(float(size)) and float(size) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"point_size must be a positive number, got {size!r}")

    def labels(self, column: str | None = None) -> np.ndarray:
        """Every row's label (string) in ``column`` (default: the current label column)."""
        column = column or self.label_column
        self._check_label_column(column)
        if column not in self._label_cache:
            if column == "label" and self.book is not None:
                self._label_cache[column] = np.asarray(self.book.labels_for(self.keys), dtype=object)
            elif column == SUBCLUSTER:
                self._label_cache[column] = self._subcluster_labels()
            elif column in self.table.columns:
                self._label_cache[column] = label_strings(self.table[column])
            else:
                self._label_cache[column] = np.full(self.n_rows, MUTED_VALUES[column], dtype=object)
        return self._label_cache[column]

    def invalidate_labels(self, column: str | None = None) -> None:
        """Forget derived label data (call after the table's labels change)."""
        if column is None:
            self._label_cache.clear()
            self._derived.clear()
        else:
            self._label_cache.pop(column, None)
            for key in [k for k in self._derived if k[1] == column]:
                del self._derived[key]

    def _cached(self, kind: str, make: Callable[[], Any]) -> Any:
        key = (kind, self.label_column)
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def label_values(self) -> list[str]:
        """Distinct labels of the drawable rows, in display order."""
        return list(self.label_counts())

    def label_counts(self) -> dict[str, int]:
        """Number of drawable rows per label, in display order."""

        def make() -> dict[str, int]:
            counts = pd.Series(self.labels()[self.valid], dtype=object).value_counts()
            return {k: int(counts[k]) for k in sort_labels(counts.index)}

        return dict(self._cached("counts", make))

    def label_text(self, value: str) -> str:
        """How a label value is shown to a person."""
        if value == self.muted_value():
            return {"cluster": "noise (-1)", "label": "(no label)", "duplicate_group": "unique (-1)"}.get(
                self.label_column, "(none)"
            )
        return value

    def label_options(self) -> list[tuple[str, str]]:
        """(value, text with count) pairs for the label MultiSelect."""
        return [(v, f"{self.label_text(v)}  ({c:,})") for v, c in self.label_counts().items()]

    def color_codes(self) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        """Colour of every row as a code into small per-label tables.

        Returns ``(code per row, colour per code, alpha per code, label value per code)``.
        Labels get palette colours in display order, cycling; the "no group" value
        (cluster -1, empty label, duplicate_group -1) is grey and faint. Works for any
        label strings (numbers or text).
        """
        return self._cached("codes", self._color_codes)

    def _color_codes(self) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        labels = self.labels()
        muted = self.muted_value()
        values = sort_labels(pd.unique(labels)) if len(labels) else []
        codes = pd.Categorical(labels, categories=values).codes.astype(np.int32)
        palette, alphas, i = [], [], 0
        for v in values:
            if v == muted:
                palette.append(MUTED_COLOR)
                alphas.append(MUTED_ALPHA)
            else:
                palette.append(PALETTE[i % len(PALETTE)])
                alphas.append(POINT_ALPHA)
                i += 1
        return codes, palette, np.asarray(alphas, dtype=float), values

    def colors(self) -> tuple[np.ndarray, np.ndarray]:
        """(colour hex, alpha) per row for the current label column."""
        codes, palette, alphas, _ = self.color_codes()
        if not len(codes):
            return np.zeros(0, dtype=object), np.zeros(0)
        return np.asarray(palette, dtype=object)[codes], alphas[codes]

    def legend(self) -> list[tuple[str, str, str, int]]:
        """(value, text, colour, count) per label of the drawable rows, in display order."""
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
        return tuple(sort_labels(pd.unique(self.labels()[rows])))

    def select(self, rows: Iterable[int]) -> None:
        """A person selected ``rows`` on the map (lasso, box): they become the selection
        and the scope, and the label filter shows the labels present in them."""
        sel = self._as_rows(rows)
        self.selection = sel
        self.scope = sel
        self.label_filter = self.present_labels(sel)
        self.neighbours = self._neighbours_for(sel)
        self._say(f"{len(sel):,} selected" if len(sel) else "nothing selected")
        self._emit("selection", "filter", "message", "neighbours")

    def set_label_filter(self, values: Iterable[str]) -> None:
        """A person chose ``values`` in the label MultiSelect: select their rows.

        With "only change selected" on, only rows of the scope are (de)selected, so
        removing a label and adding it back restores exactly the rows it had.
        """
        values = tuple(str(v) for v in values)
        known = set(self.label_values())
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown!r} in column {self.label_column!r}")
        values = tuple(sort_labels(values))
        if values == self.label_filter:
            return
        labels = self.labels()
        if self.only_selected:
            base = self.scope
            sel = base[np.isin(labels[base], list(values))] if len(base) else base
        else:
            sel = np.flatnonzero(np.isin(labels, list(values)) & self.valid).astype(np.int64)
            self.scope = sel
        self.label_filter = values
        self.selection = sel
        self._say(f"{len(sel):,} selected")
        self._emit("selection", "filter", "message")

    def clear_label_filter(self) -> None:
        """Empty the label MultiSelect: nothing is selected afterwards (the scope of
        "only change selected" is kept, so labels can be added back)."""
        self.label_filter = ()
        self.selection = np.zeros(0, dtype=np.int64)
        if not self.only_selected:
            self.scope = self.selection
        self._say("label filter cleared; nothing selected")
        self._emit("selection", "filter", "message")

    def set_only_selected(self, flag: bool) -> None:
        """Turn "only change selected" on (the current selection becomes the scope) or off."""
        flag = bool(flag)
        if flag == self.only_selected:
            return
        self.only_selected = flag
        self.scope = self.selection
        if flag:
            self._say(f"label changes now only touch the {len(self.scope):,} selected images")
        else:
            self._say("label changes select every image with the label")
        self._emit("only_selected", "message")

    def set_label_column(self, column: str) -> None:
        """Colour the map by ``column`` and filter labels on it; the selection stays."""
        self._check_label_column(column)
        if column == self.label_column:
            return
        self.label_column = column
        self.label_filter = self.present_labels()
        self._say(f"colouring by {column}")
        self._emit("label_column", "filter", "message")

    def set_point_size(self, size: float) -> None:
        self._check_point_size(size)
        self.point_size = float(size)
        self._emit("point_size")

    def reset(self) -> None:
        """Back to the state right after loading (labels are kept: undo takes them back)."""
        if self.drill:
            self.drill.clear()
            self.valid = self._base_valid
            self._base_valid = None
            self.invalidate_labels()
        self.neighbours = None
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = self.selection
        self.label_filter = ()
        self.only_selected = False
        self.label_column = self._initial["label_column"]
        self.point_size = self._initial["point_size"]
        self._say("reset: nothing selected")
        self._emit(*ASPECTS)

    def selected_table(self) -> pd.DataFrame:
        """The selected rows, every column (x and y included), labels as they are now."""
        return self.labelled().iloc[self.selection]

    # ------------------------------------------------------------------ curation: setup
    def _init_curation(self) -> None:
        t = self.table
        if "path" in t.columns:
            self.keys: list[str] = t["path"].fillna("").astype(str).tolist()
        else:
            self.keys = [f"row-{i}" for i in range(len(t))]
        #: the labels (a LabelBook over the journal); None until attach_journal
        self.book: Any = None
        self.features_path: Path | None = None
        self._features: np.ndarray | None = None
        self._norms: np.ndarray | None = None
        self._features_problem: str | None = "no embeddings loaded (features.npy)"
        #: proposals of 'label similar': DataFrame[row, file, proposed_label, confidence, votes, distance]
        self.suggestions = _empty_suggestions()
        #: (row, neighbour rows, cosine distances) of the one selected image, or None
        self.neighbours: tuple[int, np.ndarray, np.ndarray] | None = None
        #: drill-down levels: dicts with rows, xy, ids, parent, column, selection
        self.drill: list[dict[str, Any]] = []
        self._base_valid: np.ndarray | None = None
        self.tree: Any = None
        self.overview_id = "root"
        self._extra_columns: list[str] | None = None

    def label_columns(self) -> list[str]:
        """Columns the map can be coloured by: cluster, label, duplicate_group, the
        drill-down's sub-clusters and every extra (metadata) column with at most
        :data:`MAX_CATEGORIES` distinct values."""
        if self._extra_columns is None:
            from explorer.table import COLUMNS

            extra = []
            for c in self.table.columns:
                if c in COLUMNS or c in LABEL_COLUMNS or not isinstance(c, str):
                    continue
                if self.table[c].nunique(dropna=True) <= MAX_CATEGORIES:
                    extra.append(c)
            self._extra_columns = extra
        out = list(LABEL_COLUMNS)
        if self.drill:
            out.append(SUBCLUSTER)
        return out + self._extra_columns

    def attach_journal(self, journal: Any) -> None:
        """Take labels from ``journal`` (replayed) on top of the CSV's ``label`` column."""
        from explorer.labels import LabelBook

        initial = {}
        if "label" in self.table.columns:
            initial = dict(zip(self.keys, label_strings(self.table["label"]).tolist()))
        try:
            self.book = LabelBook.from_journal(journal, keys=self.keys, initial=initial)
        except OSError as exc:
            self.book = LabelBook(None, keys=self.keys, initial=initial)
            self.problems.append(f"cannot read the label journal {journal.path} ({exc}): labels will NOT be saved")
        self.invalidate_labels("label")

    def load_features(self, path: str | os.PathLike) -> None:
        """Memory-map the per-row embeddings (``NAME.features.npy``); a problem is noted, never raised."""
        path = Path(path)
        self.features_path = path
        self._features = self._norms = None
        if not path.is_file():
            self._features_problem = f"no embeddings ({path.name}): neighbours, re-cluster, propagate and overview are off"
            return
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            self._features_problem = f"cannot read {path.name} ({exc}): neighbours, re-cluster, propagate and overview are off"
            return
        if arr.ndim != 2 or arr.shape[0] != self.n_rows:
            self._features_problem = (
                f"{path.name} has shape {arr.shape}, the CSV {self.n_rows:,} rows: "
                "neighbours, re-cluster, propagate and overview are off"
            )
            return
        self._features = arr
        self._features_problem = None

    @property
    def has_features(self) -> bool:
        return self._features is not None

    def features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Embeddings (float32) of ``rows`` (all rows by default); ValueError if there are none."""
        if self._features is None:
            raise ValueError(self._features_problem or "no embeddings")
        F = self._features if rows is None else self._features[np.asarray(rows, dtype=np.int64)]
        return np.asarray(F, dtype=np.float32)

    def _refuse(self, text: str) -> None:
        self._say(text, "error")
        self._emit("message")

    # ------------------------------------------------------------------ curation: labels
    def labelled(self) -> pd.DataFrame:
        """The table with its ``label`` column as it is now (CSV labels + journal)."""
        if self.book is None:
            return self.table
        from explorer.labels import labelled_table

        return labelled_table(self.table, self.book)

    def label_names(self) -> list[str]:
        """Labels in use, most frequent first."""
        return list(self.book.counts()) if self.book is not None else []

    def _labels_changed(self) -> None:
        self.invalidate_labels("label")
        self._emit("labels", "message")

    def _label_edit(self, what: Callable[[], Any], done: str) -> bool:
        """Run a LabelBook edit; say "saved: ..." only after the journal append returned."""
        if self.book is None:
            self._refuse("labels are not available in this session")
            return False
        try:
            record = what()
        except ValueError as exc:
            self._refuse(f"not changed: {exc}")
            return False
        except OSError as exc:
            self._refuse(f"NOT saved (journal write failed: {exc})")
            return False
        if record is None:
            self._say("nothing changed")
            self._emit("message")
            return False
        journal = self.book.journal
        if journal is None:
            self._say(f"{done} (in memory only: NOT saved, there is no journal)", "warning")
        else:
            self._say(f"saved: {done} to {journal.path.name}")
        self._labels_changed()
        return True

    def _selected_keys(self) -> list[str] | None:
        if len(self.selection) == 0:
            self._refuse("select images first (lasso or box on the map)")
            return None
        return [self.keys[i] for i in self.selection]

    def apply_label(self, label: str) -> bool:
        """Give every selected image ``label`` (one undoable, journaled step)."""
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.apply(keys, label),
                                f"label {str(label).strip()!r} on {len(keys):,} image(s)")

    def discard_selection(self) -> bool:
        """Mark the selected images 'discard'."""
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.discard(keys), f"{len(keys):,} image(s) discarded")

    def clear_selection_labels(self) -> bool:
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.clear(keys), f"labels of {len(keys):,} image(s) removed")

    def rename_label(self, old: str, new: str) -> bool:
        return self._label_edit(lambda: self.book.rename(old, new), f"label {old!r} renamed to {str(new).strip()!r}")

    def merge_labels(self, a: str, b: str, into: str | None = None) -> bool:
        target = b if not into else into
        return self._label_edit(lambda: self.book.merge(a, b, into or None), f"{a!r} and {b!r} merged into {str(target).strip()!r}")

    def undo_labels(self) -> bool:
        return self._label_edit(lambda: self.book.undo(), "undone")

    def redo_labels(self) -> bool:
        return self._label_edit(lambda: self.book.redo(), "redone")

    def sync_labels(self) -> list[str]:
        """Apply other sessions' journal records; returns the changed keys (re-renders only then)."""
        if self.book is None or self.book.journal is None:
            return []
        try:
            changed = self.book.sync()
        except OSError:
            return []
        if changed:
            self._say(f"{len(changed):,} label change(s) from another session")
            self._labels_changed()
        return changed

    # ------------------------------------------------------------------ curation: neighbours
    def _neighbours_for(self, rows: np.ndarray, k: int = 12) -> tuple[int, np.ndarray, np.ndarray] | None:
        if len(rows) != 1 or self._features is None:
            return None
        from explorer.neighbours import nearest, row_norms

        if self._norms is None:
            self._norms = row_norms(self.features())
        row = int(rows[0])
        idx, dist = nearest(self.features(), row, k=k, norms=self._norms)
        return row, np.asarray(idx, dtype=np.int64), np.asarray(dist, dtype=float)

    def show_neighbours(self, row: int, k: int = 12) -> None:
        """Select image ``row`` and show its ``k`` nearest neighbours (with distances)."""
        if self._features is None:
            self._refuse(f"no neighbours: {self._features_problem}")
            return
        self.select([row])
        self.neighbours = self._neighbours_for(self.selection, k)
        self._emit("neighbours")

    def select_neighbours(self) -> None:
        """Select the shown image and its neighbours (e.g. to label them together)."""
        if self.neighbours is None:
            self._refuse("click one image first to see its neighbours")
            return
        row, idx, _ = self.neighbours
        self.select(np.concatenate([[row], idx]))

    # ------------------------------------------------------------------ curation: propagate
    def propose(self, k: int = 10, min_agreement: float = 0.6) -> int:
        """'Label similar': proposals for unlabelled images from labelled neighbours.

        Nothing is applied; returns the number of proposals (see :attr:`suggestions`)."""
        plan = self.propose_plan()
        if plan is None:
            return 0
        return self.propose_show(plan, self.propose_compute(plan, k, min_agreement), k, min_agreement)

    def propose_plan(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows that may vote or get a proposal, their labels), or None (reason in the message)."""
        if self._features is None:
            self._refuse(f"cannot propose labels: {self._features_problem}")
            return None
        from explorer.labels import DISCARD

        labels = self.labels("label")
        rows = np.flatnonzero(labels != DISCARD)
        lab = labels[rows]
        if not (lab != "").any():
            self._refuse("label some images first: proposals come from labelled neighbours")
            return None
        return rows, lab

    def propose_compute(self, plan: tuple[np.ndarray, np.ndarray], k: int = 10, min_agreement: float = 0.6) -> Any:
        """The slow part (nearest labelled neighbours); safe in a thread. A DataFrame or the ValueError."""
        from explorer.labels import propose_labels

        rows, lab = plan
        try:
            return propose_labels(self.features(rows), lab.tolist(), k=k, min_agreement=min_agreement)
        except ValueError as exc:
            return exc

    def propose_show(self, plan: tuple[np.ndarray, np.ndarray], df: Any, k: int = 10, min_agreement: float = 0.6) -> int:
        if isinstance(df, Exception):
            self._refuse(f"cannot propose labels: {df}")
            return 0
        r = plan[0][df["index"].to_numpy(dtype=np.int64)]
        self.suggestions = pd.DataFrame({
            "row": r,
            "file": [self.keys[i] for i in r],
            "proposed_label": df["proposed_label"].astype(str).to_numpy(),
            "confidence": df["confidence"].to_numpy(dtype=float),
            "votes": df["votes"].to_numpy(dtype=np.int64),
            "distance": df["distance"].to_numpy(dtype=float),
        })
        n = len(self.suggestions)
        self._say(f"{n:,} suggestion(s) for unlabelled images: accept or reject them" if n
                  else f"no suggestions (no unlabelled image has {min_agreement:.0%} of its {k} nearest labelled neighbours agreeing)")
        self._emit("suggestions", "message")
        return n

    def _suggestion_positions(self, positions: Iterable[int] | None) -> np.ndarray:
        n = len(self.suggestions)
        if positions is None:
            return np.arange(n)
        pos = np.unique(np.asarray(list(positions), dtype=np.int64))
        return pos[(pos >= 0) & (pos < n)]

    def accept_suggestions(self, positions: Iterable[int] | None = None) -> bool:
        """Apply the suggestions at ``positions`` (default: all) in one undoable step.
        Images labelled meanwhile (e.g. in another tab) keep their label."""
        pos = self._suggestion_positions(positions)
        if len(pos) == 0:
            self._refuse("no suggestions chosen")
            return False
        sub = self.suggestions.iloc[pos]
        now = self.labels("label")
        mapping = {self.keys[r]: lab for r, lab in zip(sub["row"], sub["proposed_label"]) if now[r] == ""}
        ok = self._label_edit(lambda: self.book.assign(mapping) if mapping else None,
                              f"{len(mapping):,} suggested label(s) accepted")
        self.suggestions = self.suggestions.drop(self.suggestions.index[pos]).reset_index(drop=True)
        self._emit("suggestions")
        return ok

    def reject_suggestions(self, positions: Iterable[int] | None = None) -> None:
        pos = self._suggestion_positions(positions)
        self.suggestions = self.suggestions.drop(self.suggestions.index[pos]).reset_index(drop=True)
        self._say(f"{len(pos):,} suggestion(s) rejected")
        self._emit("suggestions", "message")

    # ------------------------------------------------------------------ curation: drill down
    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of every row (the drill-down's own map while drilled in)."""
        x = pd.to_numeric(self.table["x"], errors="coerce").to_numpy(dtype=float)
        y = pd.to_numeric(self.table["y"], errors="coerce").to_numpy(dtype=float)
        if self.drill:
            top = self.drill[-1]
            x, y = np.full(self.n_rows, np.nan), np.full(self.n_rows, np.nan)
            x[top["rows"]], y[top["rows"]] = top["xy"][:, 0], top["xy"][:, 1]
        return x, y

    def _subcluster_labels(self) -> np.ndarray:
        out = np.full(self.n_rows, "", dtype=object)
        if self.drill:
            top = self.drill[-1]
            out[top["rows"]] = np.asarray(top["ids"], dtype=object)
        return out

    def breadcrumbs(self) -> list[str]:
        """"all" then the id of every drill-down level."""
        return ["all"] + [lvl["parent"] for lvl in self.drill]

    def recluster_selection(self, seed: int = 42) -> bool:
        """Cluster just the selected images again (their embeddings, no re-embedding) and
        show their own map; sub-cluster ids read ``3.1``, ``3.2``, ... ``3.noise``."""
        plan = self.recluster_plan()
        if plan is None:
            return False
        result = self.recluster_compute(*plan, seed=seed)
        return self.recluster_show(*plan, result)

    def recluster_plan(self) -> tuple[np.ndarray, str] | None:
        """(rows, parent id) to re-cluster, or None (the reason is in the message)."""
        if self._features is None:
            self._refuse(f"cannot re-cluster: {self._features_problem}")
            return None
        rows = self.selection.copy()
        if len(rows) < 2:
            self._refuse("select at least 2 images to re-cluster")
            return None
        present = pd.unique(self.labels()[rows])
        parent = str(present[0]) if len(present) == 1 and present[0] != self.muted_value() else "sel"
        return rows, re.sub(r"\s+", "_", parent)[:60] or "sel"

    def recluster_compute(self, rows: np.ndarray, parent: str, seed: int = 42) -> Any:
        """The slow part (UMAP + clustering); touches no session state (safe in a thread).
        Returns a :class:`explorer.hierarchy.Recluster` or the ``ValueError`` raised."""
        from explorer.hierarchy import recluster

        try:
            return recluster(self.features(rows), parent, seed=seed)
        except ValueError as exc:
            return exc

    def recluster_show(self, rows: np.ndarray, parent: str, rc: Any) -> bool:
        """Swap the map to the re-clustered rows (a new drill-down level)."""
        if isinstance(rc, Exception):
            self._refuse(f"cannot re-cluster: {rc}")
            return False
        if self._base_valid is None:
            self._base_valid = self.valid.copy()
        self.drill.append({
            "rows": rows.copy(), "xy": np.asarray(rc.xy, dtype=float), "ids": list(rc.sub_ids),
            "parent": parent, "column": self.label_column, "selection": rows.copy(),
        })
        self._enter_level(rows)
        note = f" ({'; '.join(rc.notes)})" if rc.notes else ""
        self._say(f"re-clustered {len(rows):,} images into {rc.n_clusters} sub-cluster(s){note}")
        self._emit("map", "label_column", "selection", "filter", "message", "columns")
        return True

    def _enter_level(self, rows: np.ndarray) -> None:
        valid = np.zeros(self.n_rows, dtype=bool)
        valid[rows] = True
        self.valid = valid & self._base_valid
        self.label_column = SUBCLUSTER if self.drill else self.label_column
        self.invalidate_labels()
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = self.selection
        self.label_filter = ()
        self.neighbours = None

    def drill_up(self, to_depth: int | None = None) -> None:
        """Back to the parent map (or to level ``to_depth``: 0 = the whole map); the
        selection that was re-clustered is selected again."""
        if not self.drill:
            return
        depth = len(self.drill) - 1 if to_depth is None else max(0, min(int(to_depth), len(self.drill)))
        if depth >= len(self.drill):
            return
        left = self.drill[depth]
        del self.drill[depth:]
        if self.drill:
            self._enter_level(self.drill[-1]["rows"])
        else:
            self.valid = self._base_valid
            self._base_valid = None
            self.invalidate_labels()
        self.label_column = left["column"]
        self.selection = left["selection"]
        self.scope = self.selection
        self.label_filter = self.present_labels()
        self._say(f"back to {self.breadcrumbs()[-1]}")
        self._emit("map", "label_column", "selection", "filter", "message", "columns")

    # ------------------------------------------------------------------ curation: overview
    def overview(self) -> Any:
        """The group hierarchy (built on first use from the embeddings), or None."""
        if self.tree is None:
            if self._features is None:
                self._refuse(f"no overview: {self._features_problem}")
                return None
            self.tree = self.overview_compute()
        return self.tree

    def overview_compute(self) -> Any:
        """Build the hierarchy (slow; touches no session state, safe in a thread)."""
        from explorer.hierarchy import build_hierarchy

        return build_hierarchy(self.features(), branching=16, min_size=max(16, min(50, self.n_rows // 16)))

    def open_group(self, group_id: str) -> bool:
        """Show group ``group_id`` (``root``, ``root-3``, ``3-14`` ...) in the overview."""
        tree = self.overview()
        if tree is None:
            return False
        try:
            node = tree.node(group_id)
        except (ValueError, KeyError) as exc:
            self._refuse(str(exc).strip("'\""))
            return False
        self.overview_id = node.id
        self._say(f"group {node.id}: {node.count:,} images" + ("" if node.children else " (not split further)"))
        self._emit("overview", "message")
        return True

    def overview_groups(self) -> list[tuple[str, int, np.ndarray]]:
        """(id, image count, representative rows) of the open group's sub-groups (itself if a leaf)."""
        tree = self.overview()
        if tree is None:
            return []
        node = tree.node(self.overview_id)
        nodes = tree.children(node.id) or [node]
        return [(c.id, c.count, np.asarray(c.representatives, dtype=np.int64)) for c in nodes]

    def select_group(self, group_id: str | None = None) -> None:
        """Select (on the map) every image of an overview group."""
        tree = self.overview()
        if tree is None:
            return
        try:
            node = tree.node(group_id or self.overview_id)
        except (ValueError, KeyError) as exc:
            self._refuse(str(exc).strip("'\""))
            return
        self.select(node.members)

    # ------------------------------------------------------------------ curation: metadata
    def join_metadata(self, data: bytes, filename: str = "", key: str | None = None) -> bool:
        """Join an uploaded CSV/JSON of per-image metadata by file name (``key`` column)."""
        from explorer.metadata import join_metadata, read_metadata

        suffix = Path(filename).suffix.lower().lstrip(".")
        fmt = suffix if suffix in ("csv", "tsv", "json", "jsonl") else None
        try:
            meta = read_metadata(data, (key or "").strip() or None, fmt=fmt)
            df, report = join_metadata(self.table, meta, (key or "").strip() or None)
        except ValueError as exc:
            self._refuse(f"metadata not joined: {exc}")
            return False
        self.table = df.reset_index(drop=True)
        self._extra_columns = None
        self.invalidate_labels()
        self._say(f"metadata {filename or 'upload'}: {report.summary()}", "info" if report.matched else "warning")
        self._emit("columns", "label_column", "message")
        return True

    def tag_columns(self) -> list[str]:
        """Extra columns that hold hashtags or comma-separated tags."""
        from explorer.metadata import looks_like_tags
        from explorer.table import COLUMNS

        return [c for c in self.table.columns
                if isinstance(c, str) and c not in COLUMNS and looks_like_tags(self.table[c])]

    def tag_counts(self, column: str) -> dict[str, int]:
        from explorer.metadata import tag_values

        if column not in self.table.columns:
            raise ValueError(f"no column {column!r}")
        return tag_values(self.table[column])

    def select_tag(self, column: str, value: str) -> None:
        """Select (highlight on the map) every image whose ``column`` carries tag ``value``."""
        from explorer.metadata import rows_with_tag

        if column not in self.table.columns:
            self._refuse(f"no column {column!r}")
            return
        try:
            mask = rows_with_tag(self.table[column], value)
        except ValueError as exc:
            self._refuse(str(exc))
            return
        self.select(np.flatnonzero(mask & self.valid))
        self._say(f"{len(self.selection):,} image(s) tagged {value!r} in {column}")
        self._emit("message")

    # ------------------------------------------------------------------ curation: save
    def save_labels(self, name: str, imagefolder: bool = False, progress: bool = True) -> SaveResult:
        """Write every row with its current label as ``exports/NAME.csv`` and, with
        ``imagefolder``, ``exports/NAME.zip``: one folder per label (ImageFolder layout;
        unlabelled and discarded images left out). NAME.csv itself is never touched."""
        stem = self._export_stem(name)
        if imagefolder and self.image_dir is None:
            raise ExportError("the original images were not found (see the warning above): no ImageFolder zip")
        df = self.labelled()
        result, zp = self._write_export_csv(stem, df, imagefolder)
        parts = [f"saved {len(df):,} row(s) with labels to {result.csv.name}"]
        if zp is not None:
            from explorer.exports import export_imagefolder

            try:
                summary = export_imagefolder(df, self.image_dir, zp, as_zip=True, progress=progress)
            except (ValueError, FileExistsError) as exc:
                parts.append(f"no ImageFolder zip: {exc}")
            else:
                result.zip = Path(summary.get("dest", zp))
                result.originals = int(summary.get("images", 0))
                result.missing = list(summary.get("missing", []))
                parts.append(f"{result.originals:,} image(s) in {len(summary.get('classes', {}))} class folder(s) to {result.zip.name}")
        return self._finish_export(result, parts)

    # ------------------------------------------------------------------ files
    def thumb_url(self, value: str) -> str:
        return thumb_url(value, self.route)

    def thumb_file(self, value: str) -> Path | None:
        """Thumbnail on disk for an ``image`` value, or ``None`` if it is not in the app."""
        if self.app_dir is None or not value or value.startswith(("http://", "https://")):
            return None
        v = value.replace("\\", "/")
        if v.startswith("/"):
            prefix = f"/{self.route}/"
            if not v.startswith(prefix):
                return None
            v = v[len(prefix) :]
        rel = posixpath.normpath(v)
        if rel.startswith("..") or rel.startswith("/") or rel == ".":
            return None
        return self.app_dir / rel

    def original_file(self, path: str) -> Path | None:
        """The original image of a ``path`` value, if it exists inside the image folder."""
        if self.image_dir is None or not path:
            return None
        rel = posixpath.normpath(path.replace("\\", "/"))
        if rel.startswith("..") or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
            return None
        f = self.image_dir / rel
        return f if f.is_file() else None

    @property
    def exports_dir(self) -> Path | None:
        return self.app_dir / "exports" if self.app_dir else None

    @property
    def downloads_dir(self) -> Path | None:
        """Where exports are linked for the browser: served at /<route>/static/exports/."""
        return self.app_dir / "static" / "exports" if self.app_dir else None

    def _reserve(self, stem: str, images: bool) -> tuple[Path, Path | None]:
        """Free names ``stem[-k].csv`` (+ ``.zip``); the CSV is created empty to claim it."""
        out = self.exports_dir
        assert out is not None and self.downloads_dir is not None
        out.mkdir(parents=True, exist_ok=True)
        for k in range(0, 100000):
            name = stem if k == 0 else f"{stem}-{k}"
            csv, zp = out / f"{name}.csv", out / f"{name}.zip"
            taken = [
                p for p in (csv, zp, self.downloads_dir / csv.name, self.downloads_dir / zp.name)
                if p.exists()
            ]  # fmt: skip
            if taken:
                continue
            try:
                fd = os.open(csv, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            return csv, (zp if images else None)
        raise ExportError(f"no free file name for {stem!r} in {out}")

    def export(self, name: str, images: bool = False, progress: bool = True) -> SaveResult:
        """Save the selected rows as ``exports/NAME.csv`` and, with ``images``, their
        images as ``exports/NAME.zip`` (originals when found, else thumbnails).

        Never overwrites: if ``NAME.csv`` or ``NAME.zip`` exists, ``NAME-1`` etc. is used.
        Raises :class:`ExportError` (with a message for the person) when nothing is
        selected, the name is refused or the app has no folder to save into.
        """
        stem = self._export_stem(name)
        if len(self.selection) == 0:
            raise ExportError("nothing selected: nothing saved")
        rows = self.selected_table()
        result, zp = self._write_export_csv(stem, rows, images)
        if zp is not None:
            self._write_zip(rows, zp, result, progress=progress)
            result.zip = zp
        parts = [f"saved {result.rows:,} row(s) to {result.csv.name}"]
        if result.zip is not None:
            what = f"{result.originals:,} original image(s)"
            if result.thumbnails:
                what += f" and {result.thumbnails:,} thumbnail(s) (originals not found)"
            parts.append(f"{what} to {result.zip.name}")
            if result.missing:
                parts.append(f"{len(result.missing):,} image(s) found neither as original nor thumbnail")
        return self._finish_export(result, parts)

    def _export_stem(self, name: str) -> str:
        """The checked file stem for an export (ExportError if refused or nowhere to save)."""
        if self.app_dir is None:
            raise ExportError("this session has no app folder to save into")
        return check_export_name(name)

    def _write_export_csv(self, stem: str, df: pd.DataFrame, with_zip: bool) -> tuple[SaveResult, Path | None]:
        """Claim free export names and write ``df`` as the CSV; returns the result and the zip path."""
        csv, zp = self._reserve(stem, with_zip)
        result = SaveResult(rows=len(df))
        try:
            write_table(df, csv)
        except BaseException:
            csv.unlink(missing_ok=True)
            raise
        result.csv = csv
        return result, zp

    def _finish_export(self, result: SaveResult, parts: list[str]) -> SaveResult:
        """Offer the written files as downloads and tell the person what was saved."""
        for f in (result.csv, result.zip):
            if f is not None:
                result.downloads.append((f.name, self._publish(f)))
        result.message = "; ".join(parts) + f" (in {self.exports_dir})"
        self._say(result.message)
        self._emit("message")
        return result

    def _publish(self, f: Path) -> str:
        """Hard-link (or copy) an export into static/exports; return its URL path."""
        dl = self.downloads_dir
        assert dl is not None
        dl.mkdir(parents=True, exist_ok=True)
        target = dl / f.name
        if not target.exists():
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
        return f"/{quote(self.route)}/static/exports/{quote(f.name)}"

    def _write_zip(self, rows: pd.DataFrame, zp: Path, result: SaveResult, progress: bool) -> None:
        tmp = zp.with_name(f".{zp.name}.tmp")
        used: set[str] = set()

        def unique(arc: str) -> str:
            base, ext = posixpath.splitext(arc)
            k, out = 1, arc
            while out in used:
                out = f"{base}-{k}{ext}"
                k += 1
            used.add(out)
            return out

        items = list(zip(rows["path"].astype(str), rows["image"].astype(str)))
        bar = None
        if progress and len(items) > 200:
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            task = bar.add_task(f"zipping {zp.name}", total=len(items))
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for path, image in items:
                    orig = self.original_file(path)
                    if orig is not None:
                        arc = posixpath.normpath(path.replace("\\", "/"))
                        zf.write(orig, unique(arc))
                        result.originals += 1
                    else:
                        thumb = self.thumb_file(image)
                        if thumb is not None and thumb.is_file():
                            zf.write(thumb, unique(f"thumbnails/{thumb.name}"))
                            result.thumbnails += 1
                        else:
                            result.missing.append(path)
                    if bar is not None:
                        bar.advance(task)
                if result.missing:
                    zf.writestr(
                        unique("MISSING.txt"),
                        "Images found neither as original nor as thumbnail:\n"
                        + "\n".join(result.missing) + "\n",
                    )  # fmt: skip
            os.replace(tmp, zp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if bar is not None:
                bar.stop()


def _empty_suggestions() -> pd.DataFrame:
    return pd.DataFrame({
        "row": pd.Series(dtype=np.int64), "file": pd.Series(dtype=object),
        "proposed_label": pd.Series(dtype=object), "confidence": pd.Series(dtype=float),
        "votes": pd.Series(dtype=np.int64), "distance": pd.Series(dtype=float),
    })


def _image_dir_from_run(csv_path: Path) -> tuple[Path | None, str | None]:
    """The original image folder from ``NAME.run.json`` (``image_dir``, else
    ``image_dir_from_csv``, via :func:`explorer.table.image_root`) and a problem message."""
    run = sidecar(csv_path, "run.json")
    if not run.is_file():
        return None, f"no run record {run.name}: Save images will zip thumbnails"
    try:
        record = json.loads(run.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"cannot read {run.name} ({exc}): Save images will zip thumbnails"
    if not isinstance(record, dict) or not (record.get("image_dir") or record.get("image_dir_from_csv")):
        return None, f"{run.name} names no image_dir: Save images will zip thumbnails"
    found = image_root_from_run(csv_path, record)[0]
    if found is not None:
        return found, None
    wanted = record.get("image_dir") or record.get("image_dir_from_csv")
    return None, f"image folder {wanted} not found: Save images will zip thumbnails"
