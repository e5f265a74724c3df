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

from explorer.table import image_root, read_table, sidecar, write_table

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
    {"selection", "filter", "only_selected", "label_column", "point_size", "message"}
)

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
    @staticmethod
    def _check_label_column(col: str) -> None:
        if col not in LABEL_COLUMNS:
            raise ValueError(f"label_column must be one of {LABEL_COLUMNS}, got {col!r}")

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
            if column in self.table.columns:
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
            counts = pd.Series(self.labels()[self.valid]).value_counts()
            return {k: int(counts[k]) for k in sort_labels(counts.index)}

        return dict(self._cached("counts", make))

    def label_text(self, value: str) -> str:
        """How a label value is shown to a person."""
        if value == MUTED_VALUES[self.label_column]:
            return {"cluster": "noise (-1)", "label": "(no label)", "duplicate_group": "unique (-1)"}[
                self.label_column
            ]
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
        muted = MUTED_VALUES[self.label_column]
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
        self._say(f"{len(sel):,} selected" if len(sel) else "nothing selected")
        self._emit("selection", "filter", "message")

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
        """Back to the state right after loading."""
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = self.selection
        self.label_filter = ()
        self.only_selected = False
        self.label_column = self._initial["label_column"]
        self.point_size = self._initial["point_size"]
        self._say("reset: nothing selected")
        self._emit(*ASPECTS)

    def selected_table(self) -> pd.DataFrame:
        """The selected rows, every column (x and y included)."""
        return self.table.iloc[self.selection]

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
        if self.app_dir is None:
            raise ExportError("this session has no app folder to save into")
        stem = check_export_name(name)
        if len(self.selection) == 0:
            raise ExportError("nothing selected: nothing saved")
        rows = self.selected_table()
        csv, zp = self._reserve(stem, images)
        result = SaveResult(rows=len(rows))
        try:
            write_table(rows, csv)
        except BaseException:
            csv.unlink(missing_ok=True)
            raise
        result.csv = csv
        if zp is not None:
            self._write_zip(rows, zp, result, progress=progress)
            result.zip = zp
        for f in (result.csv, result.zip):
            if f is not None:
                result.downloads.append((f.name, self._publish(f)))
        parts = [f"saved {result.rows:,} row(s) to {csv.name}"]
        if result.zip is not None:
            what = f"{result.originals:,} original image(s)"
            if result.thumbnails:
                what += f" and {result.thumbnails:,} thumbnail(s) (originals not found)"
            parts.append(f"{what} to {result.zip.name}")
            if result.missing:
                parts.append(f"{len(result.missing):,} image(s) found neither as original nor thumbnail")
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
    found = image_root(csv_path, record)
    if found is not None:
        return found, None
    wanted = record.get("image_dir") or record.get("image_dir_from_csv")
    return None, f"image folder {wanted} not found: Save images will zip thumbnails"
