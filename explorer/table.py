"""The one CSV schema of the project: columns, dtypes, validated reader, atomic writers.

Every CSV that ``explorer build`` writes, that the app reads and that the app or
``explorer export`` saves follows this schema. README documents it; keep the two in step.

Columns (in this order; extra columns, e.g. joined metadata, follow them unchanged):

============== ======= ===========================================================
column         dtype   meaning
============== ======= ===========================================================
path           str     image path relative to the image folder (POSIX slashes)
image          str     URL path under which the app serves the thumbnail
x, y           float   2-D map coordinates (UMAP)
cluster        int     cluster id, -1 = noise / outlier
probability    float   cluster membership strength in [0, 1]
outlier_score  float   outlier score in [0, 1] (higher = more unusual)
width, height  int     original image size in pixels (after EXIF rotation)
duplicate_group int    near-duplicate group id, -1 = no near-duplicate
label          str     a person's label ("" = none); the app's journal adds these
cluster_name   str     the cluster's name: top ImageNet concepts, and a folder or
                       metadata value most of its images share ("noise" for -1)
blurry ...     int     quality flags, 1 = flagged: blurry, dark, bright,
                       low_information, grayscale, odd_aspect, odd_size,
                       exact_duplicate (see explorer.stages.quality.flags for thresholds)
============== ======= ===========================================================
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

#: every known column and its dtype, in file order
COLUMNS: dict[str, str] = {
    "path": "str",
    "image": "str",
    "x": "float",
    "y": "float",
    "cluster": "int",
    "probability": "float",
    "outlier_score": "float",
    "width": "int",
    "height": "int",
    "duplicate_group": "int",
    "label": "str",
    "cluster_name": "str",
    # quality flags (explorer.stages.quality.FLAG_NAMES), 0/1
    "blurry": "int",
    "dark": "int",
    "bright": "int",
    "low_information": "int",
    "grayscale": "int",
    "odd_aspect": "int",
    "odd_size": "int",
    "exact_duplicate": "int",
}

#: the columns ``explorer build`` always writes
REQUIRED_COLUMNS: tuple[str, ...] = (
    "path",
    "image",
    "x",
    "y",
    "cluster",
    "probability",
    "outlier_score",
    "width",
    "height",
)

#: the columns without which the app cannot draw anything
PLOT_COLUMNS: tuple[str, ...] = ("x", "y")

#: defaults used when an optional column is missing
DEFAULTS: dict[str, Any] = {
    "cluster": -1,
    "probability": 0.0,
    "outlier_score": 0.0,
    "width": 0,
    "height": 0,
    "duplicate_group": -1,
    "label": "",
    "cluster_name": "",
    **{flag: 0 for flag in ("blurry", "dark", "bright", "low_information", "grayscale",
                            "odd_aspect", "odd_size", "exact_duplicate")},
}


class SchemaError(ValueError):
    """A CSV does not follow the schema (missing columns, no rows, bad values)."""


# --------------------------------------------------------------------------- paths
def sidecar(csv_path: str | os.PathLike, kind: str) -> Path:
    """Path of a file that belongs to ``NAME.csv``: ``NAME.<kind>``.

    kinds in use: ``run.json`` (run record), ``errors.csv`` (skipped files),
    ``embeddings`` (embedding cache folder), ``labels.jsonl`` (the app's journal).
    """
    p = Path(csv_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{kind}")


# --------------------------------------------------------------------------- writers
def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: the only portable way (briefly changes it)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where folders cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash never leaves a half-written file.

    The file gets the user's normal permissions (``0o666 & ~umask``, not ``mkstemp``'s
    0600), its bytes are fsynced before the rename, and the folder after it, so the new
    file survives a power loss once this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), default_file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (numpy scalars and paths allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Schema columns first, in schema order; any other column after them, unchanged."""
    known = [c for c in COLUMNS if c in df.columns]
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[known + extra]


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically with schema columns first. Returns the path."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(f"cannot write {path}: missing columns {missing}")
    out = order_columns(df)
    return atomic_write_text(path, out.to_csv(index=False))


def make_table(
    paths: Iterable[str],
    images: Iterable[str],
    xy: np.ndarray,
    cluster: np.ndarray,
    probability: np.ndarray,
    outlier_score: np.ndarray,
    width: Iterable[int],
    height: Iterable[int],
    duplicate_group: np.ndarray | None = None,
) -> pd.DataFrame:
    """Assemble the schema's DataFrame from the stages' arrays (no disk access)."""
    paths = list(paths)
    n = len(paths)
    xy = np.asarray(xy, dtype=float).reshape(n, 2) if n else np.zeros((0, 2))
    cols: dict[str, Any] = {
        "path": paths,
        "image": list(images),
        "x": xy[:, 0],
        "y": xy[:, 1],
        "cluster": np.asarray(cluster, dtype=int),
        "probability": np.asarray(probability, dtype=float),
        "outlier_score": np.asarray(outlier_score, dtype=float),
        "width": np.asarray(list(width), dtype=int),
        "height": np.asarray(list(height), dtype=int),
        "duplicate_group": (
            np.full(n, -1, dtype=int)
            if duplicate_group is None
            else np.asarray(duplicate_group, dtype=int)
        ),
        "label": [""] * n,
    }
    for k, v in cols.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} images")
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- reader
def coerce(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Bring known columns to their dtypes; return the frame and a list of problems.

    Never raises: values that do not parse become NaN (floats), the default
    (ints) or "" (strings), and each such column is reported once.
    """
    problems: list[str] = []
    df = df.copy()
    for col, kind in COLUMNS.items():
        if col not in df.columns:
            continue
        if kind == "str":
            df[col] = df[col].fillna("").astype(str)
        elif kind == "float" and df[col].dtype.kind in "fiu":
            df[col] = df[col].astype(float)
        elif kind == "int" and df[col].dtype.kind in "iu":
            pass
        elif kind == "float":
            blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
            vals = pd.to_numeric(df[col], errors="coerce")
            bad = int((vals.isna() & ~blank).sum())
            if bad:
                problems.append(f"column {col!r}: {bad} value(s) are not numbers")
            df[col] = vals.astype(float)
        elif kind == "int":
            vals = pd.to_numeric(df[col], errors="coerce")
            bad = int(vals.isna().sum())
            if bad:
                problems.append(
                    f"column {col!r}: {bad} value(s) are missing or not whole numbers; "
                    f"using {DEFAULTS.get(col, 0)}"
                )
            df[col] = vals.fillna(DEFAULTS.get(col, 0)).round().astype(int)
    return df, problems


def read_table(path: str | os.PathLike, strict: bool = True) -> pd.DataFrame:
    """Read a CSV of this schema.

    ``strict=True`` (the CLI and the API): raise :class:`SchemaError` naming what is wrong
    (missing file, unreadable CSV, missing required columns).

    ``strict=False`` (the app): never raise for content problems; missing optional columns
    get their defaults and every problem is listed in ``df.attrs["problems"]`` so the app
    can show it. A missing ``x``/``y`` or an unreadable file still raises, because then
    there is nothing to draw.
    """
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"CSV not found: {path}")
    try:
        header = pd.read_csv(path, nrows=0).columns
        numeric = {c for c, kind in COLUMNS.items() if kind in ("int", "float")}
        # text columns stay text exactly as written ("007" stays "007"); known numeric
        # columns go through pandas' fast parser and are only coerced here when they hold junk
        raw = pd.read_csv(path, dtype={c: str for c in header if c not in numeric},
                          keep_default_na=False, na_values={c: [""] for c in numeric})
    except pd.errors.EmptyDataError:
        raw = pd.DataFrame(columns=list(REQUIRED_COLUMNS))
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path} is not a readable CSV: {exc}") from exc
    # keep every column as given; strings stay strings
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing and strict:
        raise SchemaError(f"{path}: missing column(s) {', '.join(missing)}")
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
        absent_plot = [c for c in PLOT_COLUMNS if c not in raw.columns]
        if absent_plot:
            raise SchemaError(
                f"{path}: missing column(s) {', '.join(absent_plot)}; "
                "without map coordinates there is nothing to draw"
            )
    df, coerce_problems = coerce(raw)
    problems += coerce_problems
    for col in COLUMNS:
        if col not in df.columns:
            if col == "path":
                df[col] = [f"row-{i}" for i in range(len(df))]
            elif col == "image":
                df[col] = ""
            elif col in DEFAULTS:
                df[col] = DEFAULTS[col]
    if len(df) == 0:
        problems.append("the CSV has no rows")
    else:
        nan_xy = int((~np.isfinite(df["x"]) | ~np.isfinite(df["y"])).sum())
        if nan_xy:
            problems.append(f"{nan_xy} row(s) have no valid x/y and are not drawn")
    df = order_columns(df)
    df.attrs["problems"] = problems
    return df
