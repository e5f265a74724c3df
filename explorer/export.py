"""Export a table's images as one folder per cluster (or label), with an optional sample.

``export_folders(df, image_root, to)`` writes::

    to/cluster_0/...        every image of cluster 0 (or one folder per label)
    to/cluster_1/...
    to/outliers/...         cluster -1 (or no label)
    to/sample/cluster_0/... with ``sample=``: x % of every folder, at least one image each
    to/manifest.csv         source path, folder, file name, sampled (one row per file written)

Rules:

* existing files are never overwritten: if any file the export would write already
  exists, :class:`FileExistsError` is raised before anything is written (choose a new
  ``to`` or empty it);
* names never collide: when two images share a file name in one folder (``a/x.jpg`` and
  ``b/x.jpg``) the later one gets its relative path flattened (``b__x.jpg``), and a number
  if that is still taken (``b__x-2.jpg``);
* folder and file names are made filesystem-safe (no separators, control characters,
  leading dots, reserved Windows names);
* missing source images (or paths that leave ``image_root``) are reported in the
  summary, never fatal;
* ``mode="link"`` makes symbolic links to the sources instead of copies.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from explorer.progress import track

OUTLIERS = "outliers"
SAMPLE = "sample"
MANIFEST = "manifest.csv"
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
             *(f"lpt{i}" for i in range(1, 10))}
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]+')


def safe_name(name: str, default: str = "unnamed", max_len: int = 100) -> str:
    """A file or folder name that is valid on Linux, macOS and Windows.

    Separators, control characters and ``<>:"|?*`` become ``_``; leading dots and
    trailing dots/spaces are removed; reserved Windows names get a ``_`` suffix; the
    result is at most ``max_len`` characters (keeping the extension) and never empty.
    """
    s = unicodedata.normalize("NFC", str(name))
    s = _UNSAFE.sub("_", s).strip()
    s = s.lstrip(".").rstrip(". ")
    if not s:
        s = default
    stem, dot, ext = s.rpartition(".")
    if not dot:
        stem, ext = s, ""
    if stem.split(".")[0].lower() in _RESERVED or s.lower() in _RESERVED:
        stem = stem + "_"
    ext = ext[:16]
    keep = max_len - (len(ext) + 1 if ext else 0)
    stem = stem[:max(keep, 1)]
    return f"{stem}.{ext}" if ext else stem


def parse_sample(sample: float | str | None) -> float | None:
    """``0.1``, ``"10%"`` or ``"0.1"`` -> 0.1; None -> None. Must be in (0, 1]."""
    if sample is None:
        return None
    if isinstance(sample, str):
        s = sample.strip()
        try:
            f = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"sample must be a fraction like 0.1 or a percentage like '10%'; "
                             f"got {sample!r}") from None
    else:
        f = float(sample)
    if not 0.0 < f <= 1.0 or not np.isfinite(f):
        raise ValueError(f"sample must be in (0, 1] (or '1%'..'100%'); got {sample!r}")
    return f


def _group_keys(df: pd.DataFrame, by: str) -> list[str | None]:
    """Group of every row: 'cluster_N' or the label text; None = outliers / no label."""
    if by == "cluster":
        c = pd.to_numeric(df["cluster"], errors="coerce").fillna(-1).astype(int)
        return [None if v < 0 else f"cluster_{v}" for v in c.tolist()]
    lab = df["label"].fillna("").astype(str).str.strip().tolist()
    return [v if v else None for v in lab]


def folder_names(keys: list[str], reserved=(OUTLIERS, SAMPLE, MANIFEST)) -> dict[str, str]:
    """Map each label to a distinct safe folder name, none of them one of ``reserved``."""
    out: dict[str, str] = {}
    used = {r.lower() for r in reserved}
    for k in keys:
        base = safe_name(k, default="label")
        name, n = base, 2
        while name.lower() in used:  # case-insensitive filesystems too
            name, n = f"{base}-{n}", n + 1
        used.add(name.lower())
        out[k] = name
    return out


def unique_file(folder_used: set[str], rel: str) -> str:
    """A safe file name for ``rel`` not yet in ``folder_used`` (lower-cased names); adds it."""
    base = safe_name(PurePosixPath(rel).name, default="image")
    if base.lower() not in folder_used:
        folder_used.add(base.lower())
        return base
    flat = safe_name("__".join(p for p in PurePosixPath(rel).parts if p not in ("", "/")),
                     default="image")
    name = flat
    stem, dot, ext = flat.rpartition(".")
    if not dot:
        stem, ext = flat, ""
    n = 2
    while name.lower() in folder_used:
        name = f"{stem}-{n}.{ext}" if ext else f"{stem}-{n}"
        n += 1
    folder_used.add(name.lower())
    return name


def _sample_rows(groups: dict[str, list[int]], frac: float, seed: int) -> dict[str, list[int]]:
    """max(1, round(frac * size)) rows of each group, chosen reproducibly.

    Each group has its own random stream (seed and the group's name), so adding or
    removing other groups does not change which images a group contributes.
    """
    out = {}
    for name, rows in groups.items():
        k = max(1, int(round(frac * len(rows))))
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        pick = rng.choice(len(rows), size=min(k, len(rows)), replace=False)
        out[name] = sorted(rows[i] for i in pick)
    return out


def resolve_source(root: Path, rel: str) -> Path | None:
    """The source file of ``rel`` inside ``root``; None if it would leave ``root``."""
    p = Path(rel)
    src = p if p.is_absolute() else root / p
    try:
        src_r = src.resolve()
        src_r.relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return None
    return src_r


def _write(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(src, dst)  # raises FileExistsError rather than replace
        return
    with open(src, "rb") as fi, open(dst, "xb") as fo:  # "x": never overwrite
        shutil.copyfileobj(fi, fo, 1 << 20)
    try:
        shutil.copystat(src, dst)
    except OSError:
        pass


def export_folders(df: pd.DataFrame, image_root: str | os.PathLike, to: str | os.PathLike, *,
                   by: str = "cluster", sample: float | str | None = None, mode: str = "copy",
                   seed: int = 42, progress: bool = True) -> dict[str, Any]:
    """Copy (or link) every image of ``df`` into one folder per cluster or label.

    ``df`` follows the schema of :mod:`explorer.table` (``path`` relative to
    ``image_root``; ``cluster`` or ``label`` depending on ``by``). Returns a summary::

        {"to", "by", "mode", "sample": fraction or None, "seed",
         "folders": {folder: n_files}, "sample_folders": {folder: n_files},
         "written": n_files_written, "missing": [path, ...], "errors": [(path, reason)],
         "manifest": path of to/manifest.csv}

    Raises ValueError for bad parameters or a missing column and FileExistsError (before
    writing anything) if a file it would write already exists.
    """
    if by not in ("cluster", "label"):
        raise ValueError(f"by must be 'cluster' or 'label'; got {by!r}")
    if mode not in ("copy", "link"):
        raise ValueError(f"mode must be 'copy' or 'link'; got {mode!r}")
    frac = parse_sample(sample)
    for col in ("path", by):
        if col not in df.columns:
            raise ValueError(f"the table has no {col!r} column (needed for by={by!r})")
    root = Path(image_root)
    if not root.is_dir():
        raise ValueError(f"image_root is not a folder: {root}")
    to = Path(to)

    raw = _group_keys(df, by)
    keys = [k for k in dict.fromkeys(raw) if k is not None]
    if by == "cluster":
        keys.sort(key=lambda k: int(k.split("_")[1]))
        folder_of: dict[str | None, str] = {k: k for k in keys}
    else:
        keys.sort()
        folder_of = dict(folder_names(keys))
    folder_of[None] = OUTLIERS
    row_folder = [folder_of[k] for k in raw]

    # plan: every row's destination name, then the sample
    paths = df["path"].fillna("").astype(str).tolist()
    used: dict[str, set[str]] = {}
    plan: list[tuple[int, str, str]] = []  # (row, folder, file)
    groups: dict[str, list[int]] = {}
    for r, (rel, folder) in enumerate(zip(paths, row_folder)):
        name = unique_file(used.setdefault(folder, set()), rel)
        plan.append((r, folder, name))
        groups.setdefault(folder, []).append(r)
    file_of = {r: (folder, name) for r, folder, name in plan}
    jobs: list[tuple[int, Path, bool]] = [(r, to / folder / name, False) for r, folder, name in plan]
    sampled: set[int] = set()
    if frac is not None:
        for folder, rows in _sample_rows(groups, frac, seed).items():
            for r in rows:
                jobs.append((r, to / SAMPLE / folder / file_of[r][1], True))
                sampled.add(r)

    clash = [str(d) for _, d, _ in jobs if os.path.lexists(d)]
    if os.path.lexists(to / MANIFEST):
        clash.insert(0, str(to / MANIFEST))
    if clash:
        more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
        raise FileExistsError(f"export would overwrite {', '.join(clash[:3])}{more}; "
                              "choose an empty destination folder")

    missing: list[str] = []
    errors: list[tuple[str, str]] = []
    folders: dict[str, int] = {}
    sample_folders: dict[str, int] = {}
    bad_rows: set[int] = set()
    written = 0
    manifest = []
    for r, dst, is_sample in track(jobs, f"Export to {to}", progress):
        rel = paths[r]
        if r in bad_rows:
            continue
        src = resolve_source(root, rel)
        if src is None or not src.is_file():
            bad_rows.add(r)
            if src is None:
                errors.append((rel, f"outside the image folder {root}"))
            else:
                missing.append(rel)
            continue
        try:
            _write(src, dst, mode)
        except FileExistsError:
            errors.append((rel, f"{dst} appeared during the export; left as it was"))
            continue
        except OSError as exc:
            errors.append((rel, f"{type(exc).__name__}: {exc}"))
            continue
        written += 1
        folder = dst.parent.name
        if is_sample:
            sample_folders[folder] = sample_folders.get(folder, 0) + 1
        else:
            folders[folder] = folders.get(folder, 0) + 1
            manifest.append({"path": rel, "folder": folder, "file": dst.name,
                             "sampled": r in sampled})
    from explorer.table import atomic_write_text

    to.mkdir(parents=True, exist_ok=True)
    man_path = atomic_write_text(to / MANIFEST, pd.DataFrame(
        manifest, columns=["path", "folder", "file", "sampled"]).to_csv(index=False))
    return {"to": str(to), "by": by, "mode": mode, "sample": frac, "seed": int(seed),
            "folders": folders, "sample_folders": sample_folders, "written": written,
            "missing": missing, "errors": errors, "manifest": str(man_path)}
