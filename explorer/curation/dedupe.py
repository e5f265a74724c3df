"""Duplicates you can act on: the keep rules and the removal plan over the groups that
:mod:`explorer.stages.duplicates` finds.

Pure functions (arrays in, arrays out); reading files and writing the journal happen in the
callers (:mod:`explorer.cli_dedupe`, :mod:`explorer.app.duplicates`).

Keep rules
----------
:func:`choose_keepers` picks one image per group by a rule in :data:`KEEP_RULES`, applied
to all groups at once, with per-group overrides:

============ ==============================================================
``largest``  the most pixels (width x height)
``sharpest`` the highest sharpness (variance of the Laplacian, quality stats)
``earliest`` the earliest EXIF DateTimeOriginal (images without one last)
``shortest`` the shortest path
``first``    the first row (the build lists a folder in natural order)
============ ==============================================================

Ties go to the earlier row. The others are marked with the reserved label
:data:`MARK` (``discard``: journaled, undoable, left out of exports); :func:`mark_changes`
says which labels change, :func:`removal_table` lists what would be removed.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from explorer.curation.labels import DISCARD

#: the keep rules, in the order the CLI and the app list them
KEEP_RULES: tuple[str, ...] = ("largest", "sharpest", "earliest", "shortest", "first")

#: the mark the images that are not kept get (the reserved label; exports leave it out)
MARK = DISCARD


def check_rule(rule: str) -> str:
    if rule not in KEEP_RULES:
        raise ValueError(f"keep rule must be one of {', '.join(KEEP_RULES)}; got {rule!r}")
    return rule


def _rule_key(rule: str, *, width=None, height=None, sharpness=None, date=None, path=None,
              n: int) -> np.ndarray:
    """A float per row; the smallest is kept (NaN: never preferred)."""
    if rule == "largest":
        if width is None or height is None:
            raise ValueError("keep rule 'largest' needs width and height")
        return -(np.asarray(width, float) * np.asarray(height, float))
    if rule == "sharpest":
        if sharpness is None:
            raise ValueError("keep rule 'sharpest' needs sharpness")
        return -np.asarray(sharpness, float)
    if rule == "earliest":
        if date is None:
            raise ValueError("keep rule 'earliest' needs date (seconds; NaN = unknown)")
        return np.asarray(date, float)
    if rule == "shortest":
        if path is None:
            raise ValueError("keep rule 'shortest' needs path")
        return np.array([len(str(p)) for p in path], float)
    return np.zeros(n)


def choose_keepers(group, rule: str, *, width=None, height=None, sharpness=None, date=None,
                   path=None, overrides: Mapping[int, int] | None = None) -> np.ndarray:
    """``(N,)`` bool: the row each group keeps (rows without a group, -1, are all kept).

    ``rule`` from :data:`KEEP_RULES` decides for every group; ``overrides`` maps a group id to
    the row it keeps instead. Ties (and rows whose fact is unknown, NaN) go to the earlier row.
    """
    g = np.asarray(group, dtype=np.int64).ravel()
    n = len(g)
    check_rule(rule)
    key = _rule_key(rule, width=width, height=height, sharpness=sharpness, date=date,
                    path=path, n=n)
    if len(key) != n:
        raise ValueError(f"the facts have {len(key)} rows, the groups {n}")
    key = np.where(np.isnan(key), np.inf, key)
    keep = g < 0
    member = np.flatnonzero(~keep)
    if len(member):
        o = member[np.lexsort((member, key[member], g[member]))]
        firsts = o[np.r_[True, g[o][1:] != g[o][:-1]]]
        keep[firsts] = True
    for gid, row in (overrides or {}).items():
        row = int(row)
        if not 0 <= row < n or g[row] != int(gid) or int(gid) < 0:
            raise ValueError(f"override: row {row} is not in group {gid}")
        keep[g == int(gid)] = False
        keep[row] = True
    return keep


def mark_changes(paths: Sequence[str], group, keep, current: Sequence[str],
                 original: Sequence[str] | None = None) -> dict[str, str]:
    """The label edits that make the marks match ``keep``: every group member not kept gets
    :data:`MARK`; a kept member that carries :data:`MARK` (an earlier choice) gets its
    ``original`` label back (the CSV's; ``""`` = none). Rows without a group are left alone.
    One :meth:`LabelBook.assign` applies it (one undoable step)."""
    g = np.asarray(group, dtype=np.int64)
    keep = np.asarray(keep, dtype=bool)
    out: dict[str, str] = {}
    for r in np.flatnonzero(g >= 0):
        p, cur = str(paths[r]), str(current[r] or "")
        if not keep[r] and cur != MARK:
            out[p] = MARK
        elif keep[r] and cur == MARK:
            back = "" if original is None else str(original[r] or "")
            out[p] = "" if back == MARK else back
    return out


def group_order(group) -> np.ndarray:
    """Group ids, largest group first (ties: the lower id)."""
    g = np.asarray(group, dtype=np.int64)
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    return ids[np.lexsort((ids, -counts))]


REMOVAL_COLUMNS = ("group", "path", "kept_path", "rule", "width", "height", "sharpness",
                   "exif_date")


def removal_table(paths: Sequence[str], group, keep, rule: str, *, width=None, height=None,
                  sharpness=None, date=None):
    """A DataFrame of what would be removed (one row per image not kept): its group, its
    path, the path kept in its place, the rule and the facts it was chosen by."""
    import pandas as pd

    g = np.asarray(group, dtype=np.int64)
    keep = np.asarray(keep, dtype=bool)
    n = len(g)
    kept_of = {int(g[r]): str(paths[r]) for r in np.flatnonzero(keep & (g >= 0))}
    rows = np.flatnonzero((g >= 0) & ~keep)
    rows = rows[np.lexsort((rows, g[rows]))]

    def col(v, dtype=float):
        return np.full(n, np.nan) if v is None else np.asarray(v, dtype)

    w, h, s, d = col(width), col(height), col(sharpness), col(date)
    return pd.DataFrame({
        "group": g[rows],
        "path": [str(paths[r]) for r in rows],
        "kept_path": [kept_of.get(int(g[r]), "") for r in rows],
        "rule": rule,
        "width": w[rows], "height": h[rows], "sharpness": s[rows],
        "exif_date": [format_date(x) for x in d[rows]],
    }, columns=list(REMOVAL_COLUMNS))


# =========================================================================== facts
def format_date(seconds: float) -> str:
    """An EXIF time (seconds since 1970, UTC-naive) as ``YYYY-MM-DD HH:MM:SS``; "" if unknown."""
    if seconds is None or not np.isfinite(seconds):
        return ""
    return _dt.datetime.fromtimestamp(float(seconds), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def exif_date(path: str | os.PathLike) -> float:
    """EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime) of an image file as
    seconds since 1970 (read as UTC); NaN when the file has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            ex = img.getexif()
            sub = ex.get_ifd(0x8769)
            text = sub.get(0x9003) or sub.get(0x9004) or ex.get(0x0132)
    except Exception:  # noqa: BLE001 - no date is an answer, not an error
        return float("nan")
    if not text:
        return float("nan")
    try:
        t = _dt.datetime.strptime(str(text).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return float("nan")
    return t.replace(tzinfo=_dt.timezone.utc).timestamp()


def sharpness_of(path: str | os.PathLike, size: int = 256) -> float:
    """The quality statistic ``sharpness`` of an image file's ``size`` px thumbnail (as the
    build computes it); NaN when it cannot be read."""
    from explorer.stages.images import load_image, thumbnail
    from explorer.stages.quality import STAT_NAMES, image_stats

    try:
        img = load_image(path, size).image
        return float(image_stats(thumbnail(img.convert("RGB"), size))[STAT_NAMES.index("sharpness")])
    except Exception:  # noqa: BLE001 - unreadable: unknown, never preferred
        return float("nan")


def sharpness_many(files: Sequence[str | os.PathLike | None]) -> np.ndarray:
    """:func:`sharpness_of` of each file (NaN for ``None``), on every core (decoding releases
    the GIL: 5,996 photos in 23 s on 2 cores instead of 39 s on one)."""
    def one(f) -> float:
        return sharpness_of(f) if f is not None else float("nan")

    files = list(files)
    workers = min(len(files) // 8 + 1, os.cpu_count() or 1, 8)
    if workers <= 1:
        return np.asarray([one(f) for f in files], dtype=np.float64)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="explorer-sharpness") as ex:
        return np.asarray(list(ex.map(one, files)), dtype=np.float64)


def member_facts(root: str | os.PathLike, paths: Sequence[str], group, rule: str | None = None):
    """EXIF date and sharpness of the group members (rows with group >= 0; NaN elsewhere),
    read from ``root / path``. With ``rule`` only the fact that rule needs is read."""
    from explorer.paths import resolve_under

    g = np.asarray(group, dtype=np.int64)
    date = np.full(len(g), np.nan)
    sharp = np.full(len(g), np.nan)
    rows, files = [], []
    for r in np.flatnonzero(g >= 0):
        try:
            f = resolve_under(root, str(paths[r]), must_be_image=True)
        except ValueError:
            continue
        if rule in (None, "earliest"):
            date[r] = exif_date(f)
        rows.append(r)
        files.append(f)
    if rule in (None, "sharpest") and rows:
        sharp[rows] = sharpness_many(files)
    return date, sharp
