"""One project per server process: everything read-only about a CSV, shared by every session.

:func:`load_project` reads ``NAME.csv`` once per (file, modification time, app folder) and
returns the same :class:`Project` to every session of the process: the table, its columns as
numpy arrays, the row keys, file names, the thumbnail of each row, the memory-mapped float16
embeddings with their row norms, the overview hierarchy (read from the build's
``NAME.hierarchy.npz`` when it matches, else built once off the event loop), the codes of
the ``cluster_name`` column (the Treemap's tile names) and the label strings of the CSV's
own columns. A session (:class:`explorer.app.state.AppState`) keeps only its selection,
filters and view state and refers to these arrays; nothing here is ever modified after it
is built, and every lazily built part is built once under a lock (thread-safe).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
import pandas as pd

from explorer.app.files import thumbnail_file
from explorer import dataset
from explorer.table import read_table

__all__ = ["Project", "load_project", "project_for_route", "thumb_url_prefix", "THUMB_SEGMENT"]

#: URL segment of the per-row thumbnail handler: ``/<route>/_thumb/<row>``
THUMB_SEGMENT = "_thumb"


def thumb_url_prefix(route: str) -> str:
    """``/<route>/_thumb/``: append a row number to get that row's thumbnail."""
    return (f"/{quote(route)}" if route else "") + f"/{THUMB_SEGMENT}/"


def label_strings(series: pd.Series) -> np.ndarray:
    """A column's values as label strings ("" for missing, ints without ".0")."""
    s = series
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=float)
        finite = np.isfinite(v)
        out = np.full(len(v), "", dtype=object)
        whole = finite & (np.mod(np.where(finite, v, 0), 1) == 0)
        if whole.any():
            out[whole] = v[whole].astype(np.int64).astype(str).astype(object)
        frac = finite & ~whole
        if frac.any():
            out[frac] = [str(x) for x in v[frac]]
        return out
    if pd.api.types.is_integer_dtype(s) and not s.isna().any():
        return s.to_numpy().astype(str).astype(object)
    return s.fillna("").astype(str).to_numpy(dtype=object)


def text_codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values as str, int32 code per row) of a column; missing values are "".

    Hashing (``pd.factorize``), not sorting: 0.1 s instead of 2 s for 1M names."""
    codes, values = pd.factorize(series.fillna("").astype(str), sort=False)
    codes = codes.astype(np.int32)
    codes.setflags(write=False)
    return np.asarray(values, dtype=object).astype(str), codes


@dataclass(frozen=True)
class _Key:
    path: str
    mtime_ns: int
    size: int
    app_dir: str
    route: str
    sidecars: tuple[int, ...] = ()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


class Project:
    """The read-only data of one CSV (see the module docstring). Build with :func:`load_project`."""

    def __init__(self, csv_path: str | os.PathLike, app_dir: str | os.PathLike | None = None,
                 route: str | None = None, *, table: pd.DataFrame | None = None) -> None:
        from explorer.paths import image_root_from_run

        self.csv_path = Path(csv_path).resolve() if csv_path is not None else None
        #: the build's files (explorer.open); None for a table given without a CSV
        self.build = dataset.open(self.csv_path) if self.csv_path is not None else None
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else None
        self.route = route if route is not None else (self.app_dir.name if self.app_dir else "")
        self._lock = threading.RLock()
        df = table if table is not None else read_table(self.csv_path, strict=False)
        for col in ("x", "y"):
            if col not in df.columns:
                raise ValueError(f"table has no {col!r} column; columns are {list(df.columns)}")
        if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0:
            df = df.reset_index(drop=True)
        self.table = df
        self.problems: list[str] = list(df.attrs.get("problems", []))
        n = self.n_rows = len(df)
        self.x = pd.to_numeric(df["x"], errors="coerce").to_numpy(dtype=np.float64)
        self.y = pd.to_numeric(df["y"], errors="coerce").to_numpy(dtype=np.float64)
        self.valid = np.isfinite(self.x) & np.isfinite(self.y)
        self.valid.setflags(write=False)
        #: every row has finite coordinates (then sessions draw the shared arrays as they are)
        self.all_valid = bool(self.valid.all())
        self.x32 = self.x.astype(np.float32)
        self.y32 = self.y.astype(np.float32)
        self.rows = np.arange(n, dtype=np.int32)
        if "path" in df.columns:
            self.keys: list[str] = df["path"].fillna("").astype(str).tolist()
        else:
            self.keys = [f"row-{i}" for i in range(n)]
        self._file_names: np.ndarray | None = None
        self.image_values = (df["image"].fillna("").astype(str).to_numpy(dtype=object)
                             if "image" in df.columns else np.full(n, "", dtype=object))
        self.image_root: Path | None = None
        if self.csv_path is not None:
            self.image_root, why = image_root_from_run(self.csv_path)
            if why:
                self.problems.append(f"{why}: Save images will zip thumbnails")
        self.problems += self._check_thumbnails()
        self._labels: dict[str, np.ndarray] = {}
        self._codes: dict[str, Any] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._norms: np.ndarray | None = None
        self._tree: Any = None
        self.features: np.ndarray | None = None
        self.features_problem: str | None = "no embeddings loaded (features.npy)"
        #: why the build's stored hierarchy was not used (None: used, or there is none)
        self.tree_problem: str | None = None
        if self.csv_path is not None:
            self._load_features(self.build.features_path)
            self._load_tree(self.build.hierarchy_path)

    # ------------------------------------------------------------------ label read model
    def key_set(self) -> frozenset[str]:
        """The row keys as a frozenset (shared by every session's LabelBook)."""
        return self.cached("key_set", lambda: frozenset(self.keys))

    def initial_labels(self) -> dict[str, str]:
        """The CSV's own non-empty labels by key (shared; the journal records changes to them)."""

        def make() -> dict[str, str]:
            if "label" not in self.table.columns:
                return {}
            lab = self.labels("label")
            keep = np.flatnonzero(lab != "")
            keys = self.keys
            return {keys[i]: lab[i] for i in keep.tolist()}

        return self.cached("initial_labels", make)

    # ------------------------------------------------------------------ names
    @staticmethod
    def _name(key: str) -> str:
        return key[max(key.rfind("/"), key.rfind("\\")) + 1 :]

    def names_of(self, rows: Any) -> list[str]:
        """File names (no folders) of ``rows``."""
        keys = self.keys
        return [self._name(keys[int(i)]) for i in rows]

    @property
    def file_names(self) -> np.ndarray:
        """File name of every row (built on first use, once per process)."""
        with self._lock:
            if self._file_names is None:
                arr = np.asarray([self._name(k) for k in self.keys], dtype=object)
                arr.setflags(write=False)
                self._file_names = arr
            return self._file_names

    # ------------------------------------------------------------------ thumbnails
    def thumb_file(self, row: int) -> Path | None:
        """The thumbnail file of ``row`` inside the app folder, or None (off-site, missing, unsafe)."""
        if not 0 <= row < self.n_rows:
            return None
        return thumbnail_file(self.app_dir, self.image_values[row])

    def thumb_url(self, row: int) -> str:
        return thumb_url_prefix(self.route) + str(int(row))

    def _check_thumbnails(self) -> list[str]:
        """Messages about thumbnail values that are off-site, unsafe or missing (H5, L7, L14).

        One listing per thumbnail folder, once per process (not per session)."""
        from explorer.paths import is_app_relative_url

        if self.app_dir is None or self.n_rows == 0:
            return []
        values = pd.unique(self.image_values)
        ok = np.fromiter((is_app_relative_url(v) for v in values), dtype=bool, count=len(values))
        out = []
        bad = values[~ok]
        if len(bad):
            n_bad = int(pd.Series(self.image_values).isin(set(bad.tolist())).sum())
            shown = next((v for v in bad if v), "(empty)")
            out.append(
                f"{n_bad:,} of {self.n_rows:,} thumbnail value(s) are not paths inside the app "
                f"(e.g. {shown!r}): off-site and absolute thumbnails are never shown; those images show as blanks"
            )
        good = pd.Series(values[ok], dtype=object)
        if len(good):
            parts = good.str.rpartition("/")
            listing: dict[str, set[str]] = {}
            missing: list[str] = []
            for folder in pd.unique(parts[0]):
                if folder not in listing:
                    try:
                        listing[folder] = set(os.listdir(self.app_dir / folder))
                    except OSError:
                        listing[folder] = set()
                these = parts[parts[0] == folder]
                gone = ~these[2].isin(listing[folder])
                if gone.any():
                    missing += good[gone.to_numpy() & (parts[0] == folder).to_numpy()].tolist()
            if missing:
                n_missing = int(pd.Series(self.image_values).isin(set(missing)).sum())
                out.append(
                    f"{n_missing:,} of {self.n_rows:,} thumbnail(s) not found under {self.app_dir} "
                    f"(e.g. {missing[0]!r}); those images show as blanks"
                )
        return out

    # ------------------------------------------------------------------ labels of CSV columns
    def labels(self, column: str) -> np.ndarray:
        """Label strings of a CSV column (built once, shared; do not modify)."""
        with self._lock:
            if column not in self._labels:
                arr = label_strings(self.table[column])
                arr.setflags(write=False)
                self._labels[column] = arr
            return self._labels[column]

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """A derived value (colour codes of a CSV column, the labelling's neighbour graph ...)
        computed once per process and shared by every session. Sessions asking for the same
        key wait for the one making it; other keys do not wait (a graph can take minutes)."""
        with self._lock:
            if key in self._codes:
                return self._codes[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._codes:
                    return self._codes[key]
            value = make()
            with self._lock:
                self._codes[key] = value
            return value

    # ------------------------------------------------------------------ embeddings
    def _load_features(self, path: Path) -> None:
        self.features_path = path
        off = "neighbours, re-cluster, propagate and overview are off"
        if not path.is_file():
            self.features_problem = f"no embeddings ({path.name}): {off}"
            return
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            self.features_problem = f"cannot read {path.name} ({exc}): {off}"
            return
        if arr.ndim != 2 or arr.shape[0] != self.n_rows:
            self.features_problem = f"{path.name} has shape {arr.shape}, the CSV {self.n_rows:,} rows: {off}"
            return
        if not np.issubdtype(arr.dtype, np.floating):
            self.features_problem = f"{path.name} holds {arr.dtype}, not floats: {off}"
            return
        self.features = arr
        self.features_problem = None

    def norms(self) -> np.ndarray:
        """Row norms of the embeddings (once per process, in chunks from the memory map)."""
        from explorer.stages.neighbours import row_norms

        if self.features is None:
            raise ValueError(self.features_problem or "no embeddings")
        with self._lock:
            if self._norms is None:
                self._norms = row_norms(self.features)
                self._norms.setflags(write=False)
            return self._norms

    def feature_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 embeddings of ``rows`` (all rows: a full copy, only for whole-set work)."""
        if self.features is None:
            raise ValueError(self.features_problem or "no embeddings")
        F = self.features if rows is None else self.features[np.asarray(rows, dtype=np.int64)]
        return np.asarray(F, dtype=np.float32)

    def nearest(self, row: int, k: int = 12) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of ``row`` (cosine), straight from the memory map."""
        from explorer.stages.neighbours import nearest

        if self.features is None:
            raise ValueError(self.features_problem or "no embeddings")
        return nearest(self.features, int(row), k=k, norms=self.norms())

    def _load_tree(self, path: Path) -> None:
        """Use the hierarchy the build stored when it matches the table and the embeddings
        (row count, fingerprint, parameters); otherwise say why and leave :meth:`tree` to
        build it. A stored hierarchy also gets the tile names' codes computed now, so a
        session's first Treemap level waits for neither."""
        from explorer.stages.hierarchy import fingerprint, load_tree, overview_params

        if self.features is None or not path.is_file():
            return
        try:
            tree = load_tree(path, self.n_rows, fingerprint=fingerprint(self.features),
                             params=overview_params(self.n_rows))
        except ValueError as exc:  # HierarchyFileError: corrupt, hostile or out of step
            self.tree_problem = (f"{exc}; the hierarchy is built again when the Overview or "
                                 "Treemap tab is opened (once for every session)")
            self.problems.append(self.tree_problem)
            return
        self._tree = tree
        self.name_codes()

    def tree(self, progress: bool = False) -> Any:
        """The overview hierarchy: the build's stored one, else built once per process
        (slow: call it off the event loop)."""
        from explorer.stages.hierarchy import build_hierarchy, overview_params

        with self._lock:
            if self._tree is None:
                if self.features is None:
                    raise ValueError(self.features_problem or "no embeddings")
                # from the memory map a chunk at a time (no full float32 copy)
                self._tree = build_hierarchy(self.features, **overview_params(self.n_rows),
                                             progress=progress)
                self.name_codes()
            return self._tree

    def name_codes(self, column: str = "cluster_name") -> tuple[np.ndarray, np.ndarray] | None:
        """(distinct values, int32 code per row) of a text column, once per process; None
        without the column. The Treemap names its tiles from these."""
        if column not in self.table.columns:
            return None
        return self.cached(f"name_codes\0{column}", lambda: text_codes(self.table[column]))

    @property
    def tree_ready(self) -> Any:
        return self._tree

    def adopt_tree(self, tree: Any) -> None:
        """Use an already built hierarchy (kept if one was built meanwhile)."""
        with self._lock:
            if self._tree is None:
                self._tree = tree


# --------------------------------------------------------------------------- cache
_projects: dict[str, tuple[_Key, Project]] = {}
_routes: dict[str, Project] = {}
_lock = threading.Lock()
_loading: dict[_Key, threading.Lock] = {}


def load_project(csv_path: str | os.PathLike, app_dir: str | os.PathLike | None = None,
                 route: str | None = None) -> Project:
    """The process-wide :class:`Project` of ``csv_path`` (re-read when it, its run record,
    its features file or its hierarchy change).

    Raises :class:`explorer.table.SchemaError` when there is nothing to draw."""
    csv_path = Path(csv_path).resolve()
    st = csv_path.stat()
    app = Path(app_dir).resolve() if app_dir is not None else None
    rt = route if route is not None else (app.name if app else "")
    build = dataset.open(csv_path)
    sidecars = (_mtime(build.run_path), _mtime(build.features_path),
                _mtime(build.hierarchy_path))
    key = _Key(str(csv_path), st.st_mtime_ns, st.st_size, str(app), rt, sidecars)
    slot = f"{csv_path}\0{app}\0{rt}"
    with _lock:
        have = _projects.get(slot)
        if have is not None and have[0] == key:
            return have[1]
        gate = _loading.setdefault(key, threading.Lock())
    with gate:  # one load per key even when many sessions open at once
        with _lock:
            have = _projects.get(slot)
            if have is not None and have[0] == key:
                return have[1]
        project = Project(csv_path, app, rt)
        with _lock:
            _projects[slot] = (key, project)
            _routes[rt] = project
            _loading.pop(key, None)
        return project


def project_for_route(route: str) -> Project | None:
    """The project last loaded for an app route (the thumbnail handler uses it)."""
    with _lock:
        return _routes.get(route)


def forget_projects() -> None:
    """Drop every cached project (tests)."""
    with _lock:
        _projects.clear()
        _routes.clear()
