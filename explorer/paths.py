"""The one rule for paths: which file a CSV or run-record value may name.

A project folder (``NAME.csv``, ``NAME.run.json``, the thumbnails) is untrusted input: it may
have been sent by someone else. Everything that turns such a value into a file on disk goes
through this module:

* :func:`check_image_root` decides whether a folder may be an image root at all (never ``/``,
  a drive root, a system folder, the home folder or a folder that holds it);
* :func:`image_root_from_run` reads that folder from ``NAME.run.json`` (the relative
  ``image_dir_from_csv`` first, then the absolute ``image_dir``) and checks it;
* :func:`resolve_under` turns one CSV ``path`` value into a regular file inside that root;
* :func:`is_app_relative_url` decides whether an ``image`` (thumbnail) value may be served.

Symlink policy
--------------
Paths are checked *after* resolving symlinks. A symlink (to a file or a folder) whose target
stays inside the image root is followed; one whose target lies outside the root is refused.
:func:`explorer.stages.images.discover` follows symlinked folders while it looks for images, so a
build may list images that live outside the image folder; exports and the app then refuse those
files (reason ``"outside"``). Put the images themselves inside the image folder to export them.

Everything here is pure apart from ``stat``/``open`` calls on the paths it is asked about; the
errors are :class:`UnsafePath` (a ``ValueError``) with a message a person can act on.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import stat
import sys
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any, Callable

__all__ = [
    "UnsafePath",
    "resolve_under",
    "resolver",
    "check_image_root",
    "image_root_from_run",
    "require_image_root",
    "is_app_relative_url",
    "system_folder_reason",
    "IMAGE_SUFFIXES",
    "SYSTEM_FOLDERS",
    "user_cache_dir",
    "user_cache_file",
    "is_archive_root",
]

#: file suffixes (lower case, with dot) accepted by ``must_be_image``; kept equal to
#: :data:`explorer.stages.images.IMAGE_EXTENSIONS` (a test checks it) without importing PIL here
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

#: POSIX folders that are never an image root, nor anything inside them
SYSTEM_FOLDERS: tuple[str, ...] = (
    "/etc", "/proc", "/sys", "/dev", "/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64",
    "/libx32", "/boot", "/var", "/root", "/run", "/snap", "/opt/local/etc",
    # macOS
    "/System", "/Library", "/private/etc", "/private/var", "/cores",
)  # fmt: skip
#: exceptions inside SYSTEM_FOLDERS that hold people's files: removable media mounted by
#: udisks (/run/media/USER/...) and the per-user temporary folders of macOS
_ALLOWED_INSIDE: tuple[str, ...] = ("/run/media", "/var/folders", "/private/var/folders")
#: Windows folders (compared case-insensitively, on any drive)
_WINDOWS_SYSTEM = ("windows", "program files", "program files (x86)", "programdata")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafePath(ValueError):
    """A path from a CSV or run record that may not be used.

    ``reason`` is a short machine-readable tag: ``"empty"``, ``"absolute"``, ``"outside"``
    (``..`` or a symlink leading out), ``"missing"``, ``"not_file"``, ``"too_large"``,
    ``"not_image"``, ``"bad_root"``; ``path`` is the value that was refused.
    """

    def __init__(self, message: str, *, reason: str = "unsafe", path: Any = None):
        super().__init__(message)
        self.reason = reason
        self.path = None if path is None else str(path)


# --------------------------------------------------------------------------- one file
def _parts(rel: str) -> list[str]:
    """The components of a CSV path; backslashes count as separators (Windows-written CSVs)."""
    return [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]


def resolve_under(root: str | os.PathLike, rel: str | os.PathLike, *, must_be_image: bool = False,
                  max_bytes: int | None = None) -> Path:
    """The regular file that the CSV path ``rel`` names inside the folder ``root``.

    ``rel`` (POSIX slashes; backslashes are treated as separators too) is resolved against
    ``root`` after symlinks. Raises :class:`UnsafePath`, with a message naming ``rel``, if
    ``rel`` is empty, absolute or has a drive (``"absolute"``), contains ``..`` or resolves
    outside ``root``, e.g. through a symlink that leads out (``"outside"``), does not exist
    (``"missing"``), is not a regular file (``"not_file"``), is larger than ``max_bytes``
    (``"too_large"``), or, with ``must_be_image``, lacks an image suffix or does not open as
    an image (``"not_image"``; a cheap check of the first bytes against PIL's JPEG, PNG, GIF,
    WebP, BMP and TIFF signatures, nothing is decoded).

    A symlink whose target stays inside ``root`` is followed. ``root`` itself is resolved
    too; check it with :func:`check_image_root` first when it comes from untrusted input.
    Returns the resolved path. For many paths under one root use :func:`resolver`.
    """
    return resolver(root, must_be_image=must_be_image, max_bytes=max_bytes)(rel)


def resolver(root: str | os.PathLike, *, must_be_image: bool = False,
             max_bytes: int | None = None) -> Callable[[str | os.PathLike], Path]:
    """:func:`resolve_under` for many paths: ``root`` is resolved once, here.

    Raises :class:`UnsafePath` (``"bad_root"``) now if ``root`` is not an existing folder;
    the returned function takes ``rel`` and returns or raises like :func:`resolve_under`.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None; got {max_bytes!r}")
    try:
        base = os.path.realpath(os.fspath(root), strict=True) if sys.version_info >= (3, 10) \
            else os.path.realpath(os.fspath(root))
    except (OSError, RuntimeError) as exc:
        raise UnsafePath(f"image folder {os.fspath(root)!r} not found ({exc})",
                         reason="bad_root", path=root) from None
    if os.path.isfile(base) and is_archive_root(base):
        return _member_resolver(base, must_be_image=must_be_image, max_bytes=max_bytes)
    if not os.path.isdir(base):
        raise UnsafePath(f"image folder {os.fspath(root)!r} is not a folder", reason="bad_root",
                         path=root)
    prefix = base if base.endswith(os.sep) else base + os.sep

    def resolve(rel: str | os.PathLike) -> Path:
        text, parts = _relative_parts(rel)
        try:
            target = os.path.realpath(os.path.join(base, *parts))
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a bad name
            raise UnsafePath(f"path {text!r} cannot be resolved: {exc}", reason="missing",
                             path=text) from None
        if not target.startswith(prefix):
            raise UnsafePath(f"path {text!r} leads outside the image folder {base} (through "
                             "a symlink); refused", reason="outside", path=text)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise UnsafePath(f"path {text!r} not found in {base}", reason="missing",
                             path=text) from None
        except (OSError, ValueError) as exc:
            raise UnsafePath(f"path {text!r} cannot be read: {getattr(exc, 'strerror', exc)}",
                             reason="missing", path=text) from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"path {text!r} is not a regular file", reason="not_file",
                             path=text)
        _check_size(text, st.st_size, max_bytes)
        if must_be_image:
            _check_image_suffix(text, target, parts[-1])
            if not _opens_as_image(target):
                raise UnsafePath(f"path {text!r} does not open as an image",
                                 reason="not_image", path=text)
        return Path(target)

    return resolve


def _check_size(text: str, size: int, max_bytes: int | None) -> None:
    """:class:`UnsafePath` (``too_large``) when a file or archive member is over the cap."""
    if max_bytes is not None and size > max_bytes:
        raise UnsafePath(f"path {text!r} is {size:,} bytes, more than the limit of "
                         f"{max_bytes:,}", reason="too_large", path=text)


def _check_image_suffix(text: str, *names: str) -> None:
    """:class:`UnsafePath` (``not_image``) unless every name (the CSV's, and the file a
    symlink resolves to) ends in one of :data:`IMAGE_SUFFIXES`."""
    if any(os.path.splitext(n)[1].lower() not in IMAGE_SUFFIXES for n in names):
        raise UnsafePath(f"path {text!r} has no image suffix "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})", reason="not_image",
                         path=text)


def _relative_parts(rel: str | os.PathLike) -> tuple[str, list[str]]:
    """``(text, components)`` of a CSV path that may name a file under a root: not empty,
    not absolute, no drive, no NUL, no ``..``, not the root itself; else :class:`UnsafePath`."""
    text = os.fspath(rel)
    if not isinstance(text, str):
        raise UnsafePath(f"path {text!r} is not text", reason="absolute", path=text)
    if not text.strip():
        raise UnsafePath("empty path", reason="empty", path=text)
    if "\x00" in text:
        raise UnsafePath(f"path {text!r} contains a NUL character", reason="absolute",
                         path=text)
    if text.startswith(("/", "\\")) or _DRIVE.match(text) or PureWindowsPath(text).anchor:
        raise UnsafePath(f"path {text!r} is absolute; CSV paths must be relative to the "
                         "image folder", reason="absolute", path=text)
    parts = _parts(text)
    if ".." in parts:
        raise UnsafePath(f"path {text!r} contains '..'; it may not leave the image folder",
                         reason="outside", path=text)
    if not parts:
        raise UnsafePath(f"path {text!r} names the image folder itself, not a file",
                         reason="not_file", path=text)
    return text, parts


def _member_resolver(archive: str, *, must_be_image: bool, max_bytes: int | None):
    """:func:`resolver` for an image root that is a zip or plain tar file: the archive is
    listed once (:func:`explorer.inputs.archives.list_members`, which refuses zip-slip names, links
    and bombs), a CSV path names a member, and the function returns that
    :class:`~explorer.inputs.archives.Member` (read it with :func:`explorer.stages.images.read_file`)."""
    from explorer.inputs.archives import list_members

    try:
        members, refused = list_members(archive)
    except ValueError as exc:
        raise UnsafePath(str(exc), reason="bad_root", path=archive) from None
    by_name = {"/".join(_parts(m.name)): m for m in members}
    why_not = {"/".join(_parts(n)): why for n, why in refused}

    def resolve(rel: str | os.PathLike) -> Any:
        text, parts = _relative_parts(rel)
        key = "/".join(parts)
        member = by_name.get(key)
        if member is None:
            if key in why_not:
                raise UnsafePath(f"path {text!r} in {archive}: {why_not[key]}",
                                 reason="not_file", path=text)
            raise UnsafePath(f"path {text!r} not found in {archive}", reason="missing",
                             path=text)
        _check_size(text, member.size, max_bytes)
        if must_be_image:
            _check_image_suffix(text, parts[-1])
            try:
                head = member.head(16)
            except ValueError:
                head = b""
            if not _prefix_is_image(head):
                raise UnsafePath(f"path {text!r} does not open as an image",
                                 reason="not_image", path=text)
        return member

    return resolve


#: the PIL formats that files with :data:`IMAGE_SUFFIXES` hold
_PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO")


@functools.lru_cache(maxsize=1)
def _signature_checks() -> tuple:
    """PIL's own "does this prefix look like FORMAT" functions for :data:`_PIL_FORMATS`."""
    from PIL import Image

    Image.init()
    return tuple(Image.OPEN[f][1] for f in _PIL_FORMATS
                 if f in Image.OPEN and Image.OPEN[f][1] is not None)


def _opens_as_image(path: str | os.PathLike) -> bool:
    """True if the file starts like an image PIL opens (the 16 bytes ``Image.open`` looks at
    first, checked by the plugins' own ``_accept``; nothing is decoded)."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(16)
    except OSError:
        return False
    return _prefix_is_image(prefix)


def _prefix_is_image(prefix: bytes) -> bool:
    """True if ``prefix`` (a file's first 16 bytes) starts like an image PIL opens."""
    for accept in _signature_checks():
        try:
            ok = accept(prefix)
        except Exception:  # a plugin that dislikes a short prefix
            continue
        if ok and not isinstance(ok, str):  # a str is PIL's "looks like it, unsupported"
            return True
    return False


# --------------------------------------------------------------------------- image root
def _is_within(p: PurePath, folder: PurePath) -> bool:
    return p == folder or p.is_relative_to(folder)


def system_folder_reason(path: PurePath, home: PurePath | None = None) -> str | None:
    """Why the absolute ``path`` may not be an image root, or None (pure; no disk access).

    Works on :class:`PurePosixPath` and :class:`PureWindowsPath` alike, so both rules are
    testable everywhere.
    """
    if path.parent == path:
        return "it is the root of a filesystem or drive"
    if isinstance(path, PureWindowsPath):
        low = PureWindowsPath(str(path).lower())
        if len(low.parts) >= 2 and low.parts[1] in _WINDOWS_SYSTEM:
            return f"it is inside the system folder {PureWindowsPath(path.anchor, path.parts[1])}"
    else:
        allowed = any(_is_within(path, PurePosixPath(a)) for a in _ALLOWED_INSIDE)
        for s in SYSTEM_FOLDERS:
            if not allowed and _is_within(path, PurePosixPath(s)):
                return f"it is the system folder {s}" if path == PurePosixPath(s) else \
                    f"it is inside the system folder {s}"
    if home is not None and home.parent != home and _is_within(home, path):
        return "it is your home folder" if path == home else "it holds your home folder"
    return None


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, OSError, KeyError):
        return None


def check_image_root(root: str | os.PathLike) -> Path:
    """The resolved folder ``root``, if it may be an image root.

    Raises :class:`UnsafePath` (reason ``"bad_root"``) for ``/``, a filesystem or drive root,
    a system folder (``/etc``, ``/proc``, ``/sys``, ``/dev``, ``/bin``, ``/sbin``, ``/usr``,
    ``/lib*``, ``/boot``, ``/var``, ``/root``, ``/run``, ``/snap``, macOS ``/System``,
    ``/Library``, ``/private/...``, Windows ``C:\\Windows``, ``Program Files``,
    ``ProgramData``) or anything inside one (except removable media under ``/run/media`` and
    macOS temporary folders under ``/var/folders``), the user's home folder itself or a folder
    that holds it, and anything that is not an existing folder. Both the path as given (made
    absolute) and its symlink-resolved form are checked.
    """
    given = os.fspath(root)
    if isinstance(given, bytes) or not str(given).strip():
        raise UnsafePath(f"image folder {given!r} is not a folder name", reason="bad_root",
                         path=given)
    try:
        resolved = Path(given).resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnsafePath(f"image folder {given} not found", reason="bad_root",
                         path=given) from None
    home = _home()
    absolute = Path(os.path.abspath(given))
    for p in dict.fromkeys((absolute, resolved)):
        why = system_folder_reason(p, home)
        if why:
            shown = str(absolute) if absolute == resolved else f"{given} (= {resolved})"
            raise UnsafePath(f"image folder {shown} is refused: {why}", reason="bad_root",
                             path=given)
    if not resolved.is_dir() and not (resolved.is_file() and is_archive_root(resolved)):
        raise UnsafePath(f"image folder {given} is not a folder (nor a zip or tar file)",
                         reason="bad_root", path=given)
    return resolved


def is_archive_root(path: str | os.PathLike) -> bool:
    """True for a zip or plain tar file: an image root whose files are its members."""
    from explorer.inputs.archives import archive_kind

    return archive_kind(path) in ("zip", "tar")


def _run_record_name(csv_path: Path) -> Path:
    from explorer.table import sidecar

    return sidecar(csv_path, "run.json")


def image_root_from_run(csv_path: str | os.PathLike,
                        run: dict | None = None) -> tuple[Path | None, str | None]:
    """The original-image folder of a project, from its untrusted ``NAME.run.json``.

    Tries ``image_dir_from_csv`` (relative to the CSV's folder, so a moved or cloned project
    finds its own images) before the absolute ``image_dir``; each through
    :func:`check_image_root`. Returns ``(root, None)`` or ``(None, message)``, the message
    written for the page or the terminal. A candidate that exists but is refused (``/``, a
    system folder, the home folder) stops the search: the record is hostile or broken, and
    no other folder it names is used. ``run`` is the parsed record when the caller has it.
    """
    try:
        return require_image_root(csv_path, run), None
    except ValueError as exc:
        return None, str(exc)


def require_image_root(csv_path: str | os.PathLike, run: dict | None = None) -> Path:
    """:func:`image_root_from_run` for callers that want exceptions: the checked root, or
    :class:`UnsafePath` (reason ``"bad_root"``) when the record names a folder that exists
    but is refused, or a plain ``ValueError`` when the record is missing, unreadable or names
    no folder that exists."""
    csv_path = Path(csv_path)
    name = _run_record_name(csv_path).name
    if run is None:
        record_path = _run_record_name(csv_path)
        if not record_path.is_file():
            raise ValueError(f"no run record {name}, so the original images are not known")
        try:
            if record_path.stat().st_size > 16 << 20:
                raise ValueError(f"{name} is larger than 16 MiB; not read")
            run = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {name} ({exc})") from None
    if not isinstance(run, dict):
        raise ValueError(f"{name} is not a JSON object")
    candidates: list[tuple[str, Any]] = [
        (k, run.get(k)) for k in ("image_dir_from_csv", "image_dir") if run.get(k)
    ]
    if not candidates:
        raise ValueError(f"{name} names no image folder (image_dir_from_csv / image_dir)")
    base = csv_path.resolve().parent
    not_found: list[str] = []
    for key, value in candidates:
        if not isinstance(value, str):
            raise UnsafePath(f"{name}: {key} is not text ({type(value).__name__}); refused",
                             reason="bad_root", path=repr(value))
        if key == "image_dir_from_csv":
            text = value.replace("\\", "/") if os.sep == "/" else value
            cand = Path(text) if Path(text).is_absolute() else base / text
        else:
            cand = Path(value)
            if not cand.is_absolute():
                cand = base / value
        try:
            return check_image_root(cand)
        except UnsafePath as exc:
            if os.path.isdir(cand):
                raise UnsafePath(f"{name}: {key} {value!r} refused: {_why(exc)}",
                                 reason="bad_root", path=value) from None
            not_found.append(f"{key} {value!r}")
    raise ValueError(f"{name}: image folder not found ({'; '.join(not_found)})")


def _why(exc: UnsafePath) -> str:
    text = str(exc)
    return text.split(" is refused: ", 1)[-1]


# --------------------------------------------------------------------------- thumbnails
def is_app_relative_url(value: str) -> bool:
    """True for an ``image`` (thumbnail) value that the app may serve under its own route.

    Refused: empty values, a scheme (``http:``, ``javascript:``, ``data:``, ``C:``), an
    absolute or protocol-relative value (``/x``, ``//host/x``, ``\\\\host``), a ``..``
    component (also percent-encoded, ``%2e%2e``, which browsers decode), backslashes and
    control characters.
    """
    if not isinstance(value, str) or not value or value != value.strip():
        return False
    if _CONTROL.search(value) or "\\" in value:
        return False
    if value.startswith("/") or _SCHEME.match(value):
        return False
    for part in value.split("?", 1)[0].split("#", 1)[0].split("/"):
        dec = part.lower().replace("%2e", ".")
        if dec == "..":
            return False
    return posixpath.normpath(value) not in ("", ".")


def user_cache_dir() -> Path:
    """This user's cache folder for the tool (``$XDG_CACHE_HOME/bulk-image-explorer``, else
    ``~/.cache/bulk-image-explorer``): files that only save time and may be deleted."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bulk-image-explorer"


def user_cache_file(kind: str, ident: str, suffix: str) -> Path:
    """The file in :func:`user_cache_dir` ``/kind/`` for the thing ``ident`` names (a short
    blake2b of it, so any text can be a key): ``kind`` and ``suffix`` are ours, never input."""
    import hashlib

    name = hashlib.blake2b(ident.encode("utf-8"), digest_size=12).hexdigest()
    return user_cache_dir() / kind / (name + suffix)
