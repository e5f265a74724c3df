"""What leaves the server: thumbnail URLs, original files and the session's exports.

Every original-file path goes through :func:`explorer.paths.resolve_under` with
``must_be_image=True`` under the image root that :func:`explorer.paths.image_root_from_run`
accepted; thumbnails are served per row by our handler (``/<route>/_thumb/<row>``, see
:mod:`explorer.app.downloads`) and only when the CSV value is a path inside the app
(:func:`explorer.paths.is_app_relative_url`): off-site values are never sent to a browser.
Exports are written to the process's private :class:`explorer.app.downloads.DownloadStore`
and handed to the session that asked for them only.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

__all__ = [
    "ExportError",
    "SaveResult",
    "ExportPlan",
    "check_export_name",
    "thumb_url",
    "MAX_NAME_LENGTH",
]

MAX_NAME_LENGTH = 120
_FORBIDDEN_NAME_CHARS = set('/\\\0<>:"|?*')


class ExportError(ValueError):
    """A save request that cannot be carried out (bad name, nothing selected, too large)."""


@dataclass
class SaveResult:
    """What an export wrote and where the browser fetches it."""

    csv: Path | None = None
    zip: Path | None = None
    rows: int = 0
    originals: int = 0
    thumbnails: int = 0
    missing: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: class folders in an ImageFolder zip
    classes: int = 0
    message: str = ""
    #: (download file name, URL path) for each written file, for this session only
    downloads: list[tuple[str, str]] = field(default_factory=list)
    #: the exports' cookie paths (the browser sends the session key only there)
    cookie_paths: list[str] = field(default_factory=list)


@dataclass
class ExportPlan:
    """A snapshot of what to save (made on the event loop; written in a worker)."""

    stem: str
    table: pd.DataFrame
    images: bool
    imagefolder: bool
    owner: str
    route: str
    image_root: Path | None
    app_dir: Path | None
    thumb_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))


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
    """The static URL of a CSV ``image`` value under the app route, or "" if refused.

    Only app-relative paths (:func:`explorer.paths.is_app_relative_url`) are allowed; off-site
    (``https://``, ``//host``), absolute and ``..`` values give "" (review L7)."""
    from explorer.paths import is_app_relative_url

    if not is_app_relative_url(value):
        return ""
    rel = posixpath.normpath(value)
    prefix = f"/{quote(route)}/" if route else "/"
    return prefix + quote(rel)


def original_file(image_root: Path | None, path: str) -> Path | None:
    """The original image of a CSV ``path`` value inside ``image_root``, or None.

    The one rule (:func:`explorer.paths.resolve_under`, ``must_be_image=True``): no ``..``,
    no absolute paths, no symlinks out of the root, regular image files only."""
    from explorer.paths import UnsafePath, resolve_under

    if image_root is None or not path:
        return None
    try:
        return resolve_under(image_root, path, must_be_image=True)
    except UnsafePath:
        return None


def thumbnail_file(app_dir: Path | None, value: str) -> Path | None:
    """The thumbnail image of a CSV ``image`` value inside the app folder, or None."""
    from explorer.paths import UnsafePath, is_app_relative_url, resolve_under

    if app_dir is None or not is_app_relative_url(value):
        return None
    try:
        return resolve_under(app_dir, value.split("?", 1)[0].split("#", 1)[0], must_be_image=True)
    except UnsafePath:
        return None


def zip_entries(plan: ExportPlan, result: SaveResult) -> list[tuple[Path, str]]:
    """(file, name in the zip) for the rows of a selection export: originals when the one
    rule allows them, else the thumbnail, else listed in ``result.missing``."""
    entries: list[tuple[Path, str]] = []
    paths = plan.table["path"].fillna("").astype(str).tolist() if "path" in plan.table else [""] * len(plan.table)
    for path, thumb in zip(paths, plan.thumb_values.tolist()):
        orig = original_file(plan.image_root, path)
        if orig is not None:
            entries.append((orig, posixpath.normpath(path.replace("\\", "/"))))
            result.originals += 1
            continue
        t = thumbnail_file(plan.app_dir, thumb)
        if t is not None:
            entries.append((t, f"thumbnails/{t.name}"))
            result.thumbnails += 1
        else:
            result.missing.append(path)
    return entries


def write_export(plan: ExportPlan, progress: bool = False) -> SaveResult:
    """Write the CSV (and zip) of ``plan`` into the download store; thread-safe, touches no
    session. Raises :class:`ExportError` when a cap is hit (nothing is left behind)."""
    from explorer.app import downloads as dl
    from explorer.table import write_table

    store = dl.store()
    result = SaveResult(rows=len(plan.table))
    made: list[dl.Download] = []
    try:
        csv_item = store.reserve(plan.owner, f"{plan.stem}.csv", plan.route)
        made.append(csv_item)
        write_table(plan.table, csv_item.path)
        if csv_item.path.stat().st_size > store.budget():
            raise dl.ExportTooLarge(f"{csv_item.name} is larger than the export limit")
        zip_item = None
        if plan.images or plan.imagefolder:
            zip_item = store.reserve(plan.owner, f"{plan.stem}.zip", plan.route)
            made.append(zip_item)
            if plan.imagefolder:
                entries = _imagefolder_entries(plan, result)
            else:
                entries = zip_entries(plan, result)
            notes = {}
            if result.missing:
                notes["MISSING.txt"] = ("Images found neither as original nor as thumbnail:\n"
                                        + "\n".join(result.missing) + "\n")
            _write_zip(entries, notes, zip_item.path, store.budget() - csv_item.path.stat().st_size,
                       progress=progress)
        for item in made:
            store.publish(item)
    except dl.ExportTooLarge as exc:
        for item in made:
            store.discard(item)
        raise ExportError(str(exc)) from None
    except BaseException:
        for item in made:
            store.discard(item)
        raise
    result.csv = made[0].path
    result.zip = made[1].path if len(made) > 1 else None
    result.downloads = [(d.name, d.url) for d in made]
    result.cookie_paths = [d.cookie_path for d in made]
    return result


def _imagefolder_entries(plan: ExportPlan, result: SaveResult) -> list[tuple[Path, str]]:
    """ImageFolder layout: ``<stem>/<label>/<file>`` per labelled, not discarded, original image."""
    from explorer.labels import DISCARD

    entries: list[tuple[Path, str]] = []
    used: set[str] = set()
    classes: set[str] = set()
    labels = plan.table["label"].fillna("").astype(str).tolist() if "label" in plan.table else []
    paths = plan.table["path"].fillna("").astype(str).tolist() if "path" in plan.table else []
    for path, label in zip(paths, labels):
        if not label or label == DISCARD:
            continue
        orig = original_file(plan.image_root, path)
        if orig is None:
            result.missing.append(path)
            continue
        folder = _safe_folder(label)
        classes.add(folder)
        name = f"{plan.stem}/{folder}/{posixpath.basename(path.replace(chr(92), '/'))}"
        base, ext = posixpath.splitext(name)
        k = 1
        while name in used:
            name = f"{base}-{k}{ext}"
            k += 1
        used.add(name)
        entries.append((orig, name))
        result.originals += 1
    result.classes = len(classes)
    return entries


def _safe_folder(label: str) -> str:
    out = "".join("_" if (c in _FORBIDDEN_NAME_CHARS or ord(c) < 32) else c for c in label).strip(" .")
    return out[:MAX_NAME_LENGTH] or "_"


def _write_zip(entries: list[tuple[Path, str]], notes: dict[str, str], dest: Path, limit: int,
               progress: bool = False) -> None:
    """Stream ``entries`` (file, arcname) into the zip at ``dest``, never past ``limit`` bytes."""
    try:
        from explorer.exports import write_zip  # the one zip writer (branch files)
    except ImportError:  # pragma: no cover - until explorer.exports lands
        write_zip = None
    from explorer.app.downloads import CappedWriter

    with open(dest, "wb") as raw:
        out = CappedWriter(raw, max(0, limit), dest.name)
        if write_zip is not None:
            write_zip(entries, out, extra=notes)
            return
        import zipfile

        used: set[str] = set()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f, arc in list(entries) + [(None, k) for k in notes]:
                base, ext = posixpath.splitext(arc)
                k, name = 1, arc
                while name in used:
                    name = f"{base}-{k}{ext}"
                    k += 1
                used.add(name)
                if f is None:
                    zf.writestr(name, notes[arc])
                else:
                    zf.write(f, name)


def describe(result: SaveResult, imagefolder: bool = False) -> str:
    """The sentence shown after a save."""
    if imagefolder:
        parts = [f"saved {result.rows:,} row(s) with labels to {result.downloads[0][0]}"]
        if result.zip is not None:
            parts.append(f"{result.originals:,} image(s) in {result.classes} class folder(s) to {result.downloads[1][0]}")
            if result.missing:
                parts.append(f"{len(result.missing):,} labelled image(s) not found as originals")
        return "; ".join(parts)
    parts = [f"saved {result.rows:,} row(s) to {result.downloads[0][0]}"]
    if result.zip is not None:
        what = f"{result.originals:,} original image(s)"
        if result.thumbnails:
            what += f" and {result.thumbnails:,} thumbnail(s) (originals not found)"
        parts.append(f"{what} to {result.downloads[1][0]}")
        if result.missing:
            parts.append(f"{len(result.missing):,} image(s) found neither as original nor thumbnail")
    return "; ".join(parts)

