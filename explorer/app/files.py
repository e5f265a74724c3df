"""What leaves the server: thumbnail URLs, original files and the session's exports.

Every original-file path goes through :func:`explorer.paths.resolve_under` with
``must_be_image=True`` under the image root that :func:`explorer.paths.image_root_from_run`
accepted; thumbnails are served per row by our handler (``/<route>/_thumb/<row>``, see
:mod:`explorer.app.downloads`) and only when the CSV value is a path inside the app
(:func:`explorer.paths.is_app_relative_url`): off-site values are never sent to a browser.
Export names are checked here (:func:`check_export_name`); exports are written by
:mod:`explorer.app.downloads`. This module imports no other module of the app (a leaf).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "ExportError",
    "check_export_name",
    "thumb_url",
    "MAX_NAME_LENGTH",
]

MAX_NAME_LENGTH = 120
_FORBIDDEN_NAME_CHARS = set('/\\\0<>:"|?*')


class ExportError(ValueError):
    """A save request that cannot be carried out (bad name, nothing selected, too large)."""


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
