"""Images inside a zip or tar file, read one member at a time (nothing is extracted).

A :class:`Member` names one file inside an archive. It is what the build's stages are given
instead of a :class:`~pathlib.Path` (it pickles, so it crosses to the embedding process and
its worker threads): :func:`explorer.stages.images.read_file` calls :meth:`Member.read`, the
embedding stage's cache asks :meth:`Member.stat`, and its text form
``/abs/photos.zip!/dir/a.jpg`` is the store's key (no file of that name can exist: the
archive is a file, not a folder).

:func:`list_members` is the one check of what an archive holds. Refused, each with one
line for errors.csv (``(member name, reason)``) and never read:

* names that are absolute, carry a drive, ``..`` or control characters ("zip slip");
* symbolic and hard links, devices and FIFOs (tar), symlinks (zip, by their Unix mode);
* encrypted zip members;
* members larger than ``max_bytes`` (the build's ``--max-file-mb``);
* zip members that claim a compression ratio above :data:`MAX_RATIO` ("zip bomb"); the
  size a member claims is not trusted either: :meth:`Member.read` stops after
  ``max_bytes`` whatever the header says;
* a second member of the same name (the first one is used).

Folders, hidden files (a component starting with ``.``, e.g. ``__MACOSX/._a.jpg`` is not,
but ``.git/...`` is) and names without an image suffix are left out silently, as
:func:`explorer.stages.images.discover` does in a folder.

Compressed tar files (``.tar.gz`` ...) cannot seek to a member; :func:`plain_tar` turns one
into a plain ``.tar`` (one decompression, capped) that is then read like any other.
Standard library only (no import of the rest of the package).
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass

__all__ = ["Member", "MemberError", "list_members", "archive_kind", "plain_tar", "unsafe_name",
           "ARCHIVE_SUFFIXES", "MAX_RATIO", "MAX_MEMBERS"]

#: suffixes (lower case) of the archives a build reads, and their kind
ARCHIVE_SUFFIXES: dict[str, str] = {
    ".zip": "zip", ".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz",
    ".tar.bz2": "tar.bz2", ".tbz2": "tar.bz2", ".tar.xz": "tar.xz", ".txz": "tar.xz",
}
#: a zip member that claims to expand more than this many times is refused (zip bomb)
MAX_RATIO = 100
#: members larger than this expand ratio-checked; small files may compress very well
_RATIO_MIN_BYTES = 1 << 20
#: an archive listing more members than this is refused outright
MAX_MEMBERS = 5_000_000
#: image suffixes (kept equal to explorer.paths.IMAGE_SUFFIXES; a test checks it)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class MemberError(ValueError):
    """An archive member that cannot be read; ``reason`` is the errors.csv text."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def archive_kind(path: str | os.PathLike) -> str | None:
    """``"zip"``, ``"tar"``, ``"tar.gz"``, ``"tar.bz2"``, ``"tar.xz"`` by the file name, or
    None (pure: the one place that maps a suffix to an archive kind)."""
    low = os.fspath(path).lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return ARCHIVE_SUFFIXES[suffix]
    return None


@dataclass(frozen=True)
class Member:
    """One regular file inside a zip or plain tar ``archive`` (an absolute path).

    ``offset`` is where a tar member's bytes start (unused for zip); ``size`` is the size the
    archive claims; ``mtime_ns`` is the archive's (a changed archive is hashed again).
    """

    archive: str
    name: str
    size: int
    kind: str  # "zip" or "tar"
    offset: int = 0
    mtime_ns: int = 0

    def __fspath__(self) -> str:
        return f"{self.archive}!/{self.name}"

    def __str__(self) -> str:
        return self.__fspath__()

    @property
    def rel(self) -> str:
        """The member's name: the CSV ``path`` value."""
        return self.name

    def stat(self) -> tuple[int, int]:
        """``(size, mtime_ns)`` for the embedding cache: the member's size, the archive's
        modification time. ``FileNotFoundError`` when the archive is gone."""
        return self.size, os.stat(self.archive).st_mtime_ns

    def head(self, n: int) -> bytes:
        """The member's first ``n`` bytes (a signature check); :class:`MemberError` when
        it cannot be read."""
        try:
            if self.kind == "zip":
                with _zip(self.archive, self.mtime_ns).open(self.name) as fh:
                    return fh.read(n)
            with open(self.archive, "rb") as fh:
                fh.seek(self.offset)
                return fh.read(min(n, self.size))
        except (OSError, zipfile.BadZipFile, KeyError, EOFError, RuntimeError,
                NotImplementedError) as exc:
            raise MemberError(self.name, f"cannot read archive member ({exc})") from None

    def read(self, max_bytes: int | None = None) -> bytes:
        """The member's bytes; :class:`MemberError` when it is larger than ``max_bytes`` (also
        when it expands past that whatever its header claims), damaged or gone."""
        if max_bytes is not None and self.size > max_bytes:
            raise MemberError(self.name, too_large(self.size, max_bytes))
        cap = self.size if max_bytes is None else max_bytes
        try:
            if self.kind == "zip":
                with _zip(self.archive, self.mtime_ns).open(self.name) as fh:
                    data = fh.read(cap + 1)
            else:
                with open(self.archive, "rb") as fh:
                    fh.seek(self.offset)
                    data = fh.read(self.size)
                if len(data) != self.size:
                    raise MemberError(self.name, "truncated archive member")
        except MemberError:
            raise
        except FileNotFoundError:
            raise MemberError(self.name, f"archive not found: {self.archive}") from None
        except (OSError, zipfile.BadZipFile, KeyError, EOFError, RuntimeError,
                NotImplementedError) as exc:
            raise MemberError(self.name, f"cannot read archive member ({exc})") from None
        if len(data) > cap:
            raise MemberError(self.name, "member expands past its declared size or the size "
                              "limit (zip bomb?)")
        return data


def too_large(size: int, limit: int) -> str:
    return f"file too large ({size / 2**20:.1f} MB; limit {limit / 2**20:g} MB, see --max-file-mb)"


_local = threading.local()


def _zip(archive: str, version: int) -> zipfile.ZipFile:
    """An open ZipFile per archive, per thread and process (a zip's central directory is read
    once, not once per member). ``version`` is the archive's mtime when it was listed: a
    zip replaced since is opened afresh (the old handle is closed)."""
    cache = getattr(_local, "zips", None)
    if cache is None or getattr(_local, "pid", None) != os.getpid():
        cache = _local.zips = {}
        _local.pid = os.getpid()
    got = cache.get(archive)
    if got is None or got[0] != version:
        if got is not None:
            got[1].close()
        got = cache[archive] = (version, zipfile.ZipFile(archive))
    return got[1]


def unsafe_name(name: str) -> str | None:
    """Why a member (or remote object) name may not be used as a relative path, or None."""
    if not name or _CONTROL.search(name):
        return "unsafe member name (control characters); refused"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute member name (zip slip); refused"
    if ".." in re.split(r"[\\/]", name):
        return "member name with '..' (zip slip); refused"
    return None


def wanted_name(name: str) -> bool:
    """True for a name `explorer build` reads: an image suffix, no hidden component."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") for p in parts):
        return False
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES


def list_members(archive: str | os.PathLike, *, max_bytes: int | None = None
                 ) -> tuple[list[Member], list[tuple[str, str]]]:
    """The image members of a zip or plain tar file, in archive order, and ``(name, reason)``
    for each refused one (see the module docstring). Raises ``ValueError`` when the file is
    not a readable archive of that kind or lists more than :data:`MAX_MEMBERS` members."""
    path = os.path.abspath(os.fspath(archive))
    kind = archive_kind(path)
    if kind not in ("zip", "tar"):
        raise ValueError(f"{path}: not a zip or plain tar file (compressed tar files go "
                         "through plain_tar first)")
    try:
        mtime = os.stat(path).st_mtime_ns
        entries = _zip_entries(path) if kind == "zip" else _tar_entries(path)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ValueError(f"cannot read the archive {path}: {exc}") from None
    members: list[Member] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, (name, why, size, offset) in enumerate(entries):
        if n >= MAX_MEMBERS:
            raise ValueError(f"{path} lists more than {MAX_MEMBERS:,} members; refused")
        shown = name.replace("\\", "/")
        problem = unsafe_name(name)
        if problem is None and why is None and not wanted_name(name):
            continue  # a folder, a hidden or a non-image file: left out, as in a folder
        if problem is None:
            problem = why
        if problem is None and max_bytes is not None and size > max_bytes:
            problem = too_large(size, max_bytes)
        if problem is None and name in seen:
            problem = "a second member with this name; only the first one is used"
        if problem is not None:
            errors.append((shown, problem))
            continue
        seen.add(name)
        members.append(Member(path, name, int(size), kind, int(offset), mtime))
    return members, errors


def _zip_entries(path: str):
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    for info in infos:
        if info.is_dir():
            continue
        why = None
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode and stat.S_ISLNK(mode):
            why = "symbolic link member; refused"
        elif mode and info.create_system == 3 and not stat.S_ISREG(mode) and \
                stat.S_IFMT(mode) != 0:
            why = "not a regular file; refused"
        elif info.flag_bits & 0x1:
            why = "encrypted member; refused"
        elif info.file_size >= _RATIO_MIN_BYTES and \
                info.file_size > MAX_RATIO * max(info.compress_size, 1):
            why = (f"expands {info.file_size / max(info.compress_size, 1):,.0f} times "
                   f"(more than {MAX_RATIO}; zip bomb?); refused")
        yield info.filename, why, info.file_size, 0


def _tar_entries(path: str):
    with tarfile.open(path, "r:") as tf:
        for ti in tf:
            if ti.isdir():
                continue
            why = None
            if ti.issym() or ti.islnk():
                why = f"{'symbolic' if ti.issym() else 'hard'} link member; refused"
            elif not ti.isreg():
                why = "not a regular file (device, FIFO ...); refused"
            elif ti.sparse is not None:
                why = "sparse member; refused"
            yield ti.name, why, ti.size, ti.offset_data


def plain_tar(archive: str | os.PathLike, out: str | os.PathLike, *, max_total: int) -> str:
    """Decompress the compressed tar ``archive`` into the plain tar file ``out`` (kept; a
    second call for the same archive, same size and mtime, does nothing). Stops with
    ``ValueError`` past ``max_total`` bytes (a decompression bomb); returns ``out``."""
    import bz2
    import gzip
    import lzma

    src = os.fspath(archive)
    dst = os.fspath(out)
    kind = archive_kind(src)
    opener = {"tar.gz": gzip.open, "tar.bz2": bz2.open, "tar.xz": lzma.open}.get(kind or "")
    if opener is None:
        raise ValueError(f"{src}: not a compressed tar file")
    st = os.stat(src)
    stamp = json.dumps({"source": os.path.abspath(src), "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns})
    stamp_path = f"{dst}.source.json"  # what the plain copy was made from
    try:
        with open(stamp_path, encoding="utf-8") as fh:
            if fh.read() == stamp and os.path.isfile(dst):
                return dst
    except OSError:
        pass
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.tmp"
    total = 0
    try:
        with opener(src, "rb") as fi, open(tmp, "wb") as fo:
            while block := fi.read(1 << 20):
                total += len(block)
                if total > max_total:
                    raise ValueError(f"{src} expands to more than {max_total / 2**30:.1f} GB; "
                                     "refused (decompression bomb?)")
                fo.write(block)
        os.replace(tmp, dst)
        with open(stamp_path, "w", encoding="utf-8") as fh:
            fh.write(stamp)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ValueError(f"cannot decompress {src}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
