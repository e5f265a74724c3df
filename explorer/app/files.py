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
    #: images left out because the export size limit was reached
    left_out: int = 0
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


def write_export(plan: ExportPlan, progress: bool = False) -> SaveResult:
    """Write the CSV (and zip) of ``plan`` into the download store; thread-safe, touches no
    session. The zip is planned and streamed by :mod:`explorer.exports` (the one path rule
    and the one zip writer) into a private temporary file, within the store's size budget;
    images past the budget are left out and counted. Raises :class:`ExportError` when even
    the CSV does not fit (nothing is left behind)."""
    from explorer import exports
    from explorer.app import downloads as dl
    from explorer.table import write_table

    store = dl.store()
    result = SaveResult(rows=len(plan.table))
    made: list[dl.Download] = []
    try:
        csv_item = store.reserve(plan.owner, f"{plan.stem}.csv", plan.route)
        made.append(csv_item)
        write_table(plan.table, csv_item.path)
        budget = store.budget() - csv_item.path.stat().st_size
        if budget < 0:
            raise dl.ExportTooLarge(f"{csv_item.name} is larger than the export limit of {store.budget():,} bytes")
        if plan.images or plan.imagefolder:
            if plan.image_root is None and (plan.imagefolder or plan.app_dir is None):
                raise ExportError("the original images are not known (see the note above): no zip")
            if plan.imagefolder:
                xp = exports.plan_export(plan.table, plan.image_root, layout="label", imagefolder=True)
                entries = [(f"{plan.stem}/{arc}", src) for arc, src in xp.entries]
                result.classes = len([k for k in xp.classes if k])
            else:
                xp = exports.plan_export(plan.table, plan.image_root, layout="flat", thumb_root=plan.app_dir)
                entries = list(xp.entries)
                result.thumbnails = xp.thumbnails
            result.originals = xp.originals
            result.missing = [r.path for r in xp.refused]
            note = xp.refused_note("Images found neither as original nor as thumbnail" if not plan.imagefolder
                                   else "Labelled images not exported")
            zip_item = store.reserve(plan.owner, f"{plan.stem}.zip", plan.route)
            made.append(zip_item)
            with open(zip_item.path, "wb") as raw:
                # the writer's cap counts source bytes; the CappedWriter also bounds zip overhead
                out = dl.CappedWriter(raw, budget, zip_item.name)
                report = exports.write_zip(entries, out, max_bytes=max(0, budget - (1 << 20)),
                                           extra={"MISSING.txt": note} if note else None)
            result.left_out = len(report.left_out)
            result.originals -= sum(1 for a, _ in report.failed)
        for item in made:
            store.publish(item)
    except (dl.ExportTooLarge, ValueError) as exc:  # ExportError is a ValueError too
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


def describe(result: SaveResult, imagefolder: bool = False) -> str:
    """The sentence shown after a save."""
    csv_name = result.downloads[0][0]
    if imagefolder:
        parts = [f"saved {result.rows:,} row(s) with labels to {csv_name}"]
        what = f"{result.originals:,} image(s) in {result.classes} class folder(s)"
        missing = "labelled image(s) not found as originals"
    else:
        parts = [f"saved {result.rows:,} row(s) to {csv_name}"]
        what = f"{result.originals:,} original image(s)"
        if result.thumbnails:
            what += f" and {result.thumbnails:,} thumbnail(s) (originals not found)"
        missing = "image(s) found neither as original nor thumbnail"
    if result.zip is not None:
        parts.append(f"{what} to {result.downloads[1][0]}")
        if result.missing:
            parts.append(f"{len(result.missing):,} {missing}")
    if result.left_out:
        parts.append(f"{result.left_out:,} image(s) left out: the export size limit was reached")
    return "; ".join(parts)

