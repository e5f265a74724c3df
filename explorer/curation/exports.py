"""Every export of images: plan what to write, then write it as folders or a streamed zip.

One module for what used to be three writers (``export.export_folders``,
``imagefolder.export_imagefolder`` and the app's ``_write_zip``):

1. :func:`plan_export` (pure apart from ``stat`` and a header read per file) lists what an
   export writes as ``(arcname, source)`` pairs. Every source goes through
   :func:`explorer.paths.resolve_under` with ``must_be_image=True``: nothing leaves but images
   from the image folder. Refused rows (missing, outside the folder, not an image, too large)
   are listed with their reason, never fatal. Layouts:

   ``"cluster"``  ``cluster_0/...``, ``cluster_1/...``, ``outliers/...`` (cluster -1)
   ``"label"``    one folder per label, ``outliers/...`` for rows without a label
   ``"flat"``     the rows' own relative paths (the app's "Save images" of a selection),
                  with ``thumbnails/NAME`` for rows whose original is not available
   ``imagefolder=True`` with ``"label"`` or ``"cluster"``: a torchvision ``ImageFolder``
   tree: one folder per class, rows without a label (or noise) left out unless asked for;
   ``sample=`` adds ``sample/<folder>/...`` to the folder layouts. Rows labelled ``discard``
   (also the duplicates ``explorer dedupe`` did not keep) are left out of the cluster and
   label layouts unless ``skip_discard=False``.

2. :func:`write_zip` streams entries into any binary file object (a file, a socket-like
   writer, an HTTP response) one chunk at a time; it never holds a whole image, let alone
   the zip, in memory. JPEG/PNG/WebP/GIF are stored as they are, other files deflated.
   :func:`write_zip_file` does that atomically to a path, never replacing an existing file.

3. :func:`export_folders` and :func:`export_imagefolder` (what ``explorer export`` runs) copy,
   link or zip a plan.

Rules shared by all: names are made filesystem-safe (:func:`safe_name`) and never collide
(``b__x.jpg``, ``x-2.jpg``); folder names are distinct even on case-insensitive filesystems
and never one of the reserved names (``outliers``, ``sample``, ``manifest.csv``,
``labels.csv``, ``unlabelled``), so a real label ``"unlabelled"`` or ``"outliers"`` gets its
own folder (``unlabelled-2``); nothing existing is ever overwritten. Symlinks: see
:mod:`explorer.paths` (followed inside the image folder, refused when they lead out).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd

from explorer.inputs.archives import Member
from explorer.inputs.sources import HF_FILE_NAME
from explorer.paths import UnsafePath, is_app_relative_url, is_archive_root, resolve_under, resolver
from explorer.progress import track

__all__ = [
    "ExportPlan", "Refused", "ZipReport", "plan_export", "write_zip", "write_zip_file",
    "export_folders", "export_imagefolder", "export_parquet", "export_hf", "safe_name",
    "parse_sample", "folder_names",
    "unique_file", "OUTLIERS", "SAMPLE", "MANIFEST", "LABELS_CSV", "UNLABELLED", "THUMBNAILS",
    "IMAGEFOLDER_EXTENSIONS", "STORED_SUFFIXES",
]  # fmt: skip

OUTLIERS = "outliers"
SAMPLE = "sample"
MANIFEST = "manifest.csv"
#: name of the labels CSV at the top of an ImageFolder tree
LABELS_CSV = "labels.csv"
#: folder for rows without a label in an ImageFolder export with ``skip_unlabelled=False``
UNLABELLED = "unlabelled"
#: folder of the thumbnails that stand in for missing originals in a flat export
THUMBNAILS = "thumbnails"
#: what torchvision.datasets.ImageFolder loads (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")
#: already-compressed formats, stored in zips without recompressing
STORED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
#: bytes read and written at a time by the copy and zip loops
CHUNK = 1 << 20

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
             *(f"lpt{i}" for i in range(1, 10))}
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]+')
_LAYOUTS = ("cluster", "label", "flat")


# --------------------------------------------------------------------------- names
def safe_name(name: str, default: str = "unnamed", max_len: int = 100) -> str:
    """A file or folder name that is valid on Linux, macOS and Windows.

    Separators, control characters and ``<>:"|?*`` become ``_``; leading dots and
    trailing dots/spaces are removed; reserved Windows names get a ``_`` suffix; the
    result is at most ``max_len`` characters (keeping the extension) and never empty.
    Lone surrogates (undecodable bytes in a file name) become ``_``. Format characters
    (Unicode category Cf: the bidi overrides and isolates that make ``\u202egpj.exe`` look
    like ``exe.jpg``, zero-width joiners, BOMs) are removed.
    """
    s = unicodedata.normalize("NFC", str(name))
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\ufffd", "_")
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Cf")
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


def folder_names(keys: Iterable[str], reserved: Sequence[str] = (OUTLIERS, SAMPLE, MANIFEST)
                 ) -> dict[str, str]:
    """Map each key to a distinct safe folder name, none of them one of ``reserved``."""
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


def _unique_arc(used: set[str], arc: str) -> str:
    base, ext = posixpath.splitext(arc)
    out, k = arc, 2
    while out.lower() in used:
        out, k = f"{base}-{k}{ext}", k + 1
    used.add(out.lower())
    return out


def _sample_rows(groups: dict[str, list[int]], frac: float, seed: int) -> dict[str, list[int]]:
    """max(1, round(frac * size)) rows of each group, chosen reproducibly.

    Each group has its own random stream (seed and the group's name), so adding or
    removing other groups does not change which images a group contributes.
    """
    out = {}
    for name, rows in groups.items():
        k = max(1, int(round(frac * len(rows))))
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8", "replace"))])
        pick = rng.choice(len(rows), size=min(k, len(rows)), replace=False)
        out[name] = sorted(rows[i] for i in pick)
    return out


# --------------------------------------------------------------------------- plan
#: what ``MISSING.txt`` says for each refusal reason (explorer.paths.UnsafePath reasons)
REFUSED_WHY = {
    "no_root": "the original image folder is not known",
    "empty": "empty path",
    "absolute": "absolute path; CSV paths must be relative to the image folder",
    "outside": "leads outside the image folder; refused",
    "missing": "not found in the image folder",
    "not_file": "not a regular file",
    "too_large": "larger than the export's per-file limit",
    "not_image": "not an image",
}


class Refused(NamedTuple):
    """A row whose image is not exported: its CSV ``path``, a reason tag, a message."""

    path: str
    reason: str  # an explorer.paths.UnsafePath reason, or "no_root"
    message: str


@dataclass
class ExportPlan:
    """What an export writes. ``entries[i]`` comes from row position ``rows[i]`` of the table.

    ``export_path[r]`` is the arcname of row ``r``'s main copy ("" if not exported);
    ``folders``/``sample_folders`` count files per top folder; ``classes`` counts rows per
    group key (label text or ``cluster_N``); ``folder_of`` maps group keys to folder names.
    """

    entries: list[tuple[str, Path]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    export_path: list[str] = field(default_factory=list)
    sampled: set[int] = field(default_factory=set)
    folders: dict[str, int] = field(default_factory=dict)
    sample_folders: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    folder_of: dict[str, str] = field(default_factory=dict)
    skipped_unlabelled: int = 0
    skipped_discard: int = 0
    originals: int = 0
    thumbnails: int = 0
    renamed: int = 0

    @property
    def missing(self) -> list[str]:
        """Paths whose file is not there (or not a regular file)."""
        return [r.path for r in self.refused if r.reason in ("missing", "not_file", "empty")]

    @property
    def outside(self) -> list[str]:
        """Paths refused because they are absolute or lead outside the image folder."""
        return [r.path for r in self.refused if r.reason in ("absolute", "outside")]

    def refused_note(self, title: str = "Images not exported") -> bytes | None:
        """A small text file listing the refused rows (for ``MISSING.txt``); None if none.

        Each line is the row's CSV path and why, in words that name no folder of the machine
        that wrote it (the file travels to whoever downloads the export)."""
        if not self.refused:
            return None
        lines = [f"{title} ({len(self.refused)}):"]
        lines += [f"{r.path}\t{REFUSED_WHY.get(r.reason, r.reason)}" for r in self.refused]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _group_keys(df: pd.DataFrame, by: str, cluster_col: str, label_col: str) -> list[str | None]:
    """Group of every row: 'cluster_N' or the label text; None = noise / no label."""
    if by == "cluster":
        c = pd.to_numeric(df[cluster_col], errors="coerce").fillna(-1).astype(int)
        return [None if v < 0 else f"cluster_{v}" for v in c.tolist()]
    lab = df[label_col].fillna("").astype(str).str.strip().tolist()
    return [v if v else None for v in lab]


def plan_export(df: pd.DataFrame, image_root: str | os.PathLike | None, *,
                layout: str = "cluster", imagefolder: bool = False,
                sample: float | str | None = None, seed: int = 42,
                skip_unlabelled: bool = True, skip_discard: bool = True,
                thumb_root: str | os.PathLike | None = None, max_file_bytes: int | None = None,
                path_col: str = "path", label_col: str = "label", cluster_col: str = "cluster",
                image_col: str = "image") -> ExportPlan:
    """List what exporting ``df``'s images writes, as ``(arcname, source)`` pairs.

    ``image_root`` is the folder the ``path`` column is relative to (check untrusted roots
    with :func:`explorer.paths.check_image_root` first; ``None`` only for ``layout="flat"``
    with ``thumb_root``: then every row uses its thumbnail). ``layout`` is ``"cluster"``,
    ``"label"`` or ``"flat"`` (see the module docstring). ``imagefolder`` makes the
    cluster/label layout an ImageFolder tree: rows without a group (no label, cluster -1) are
    skipped (``skip_unlabelled``; else they go to ``unlabelled/`` or ``outliers/``). Rows labelled ``discard`` are skipped in the cluster and label layouts
    (``skip_discard``; counted in ``plan.skipped_discard``). ``sample`` adds ``sample/...`` copies
    (cluster/label folders only). ``thumb_root`` (flat only): the app folder the ``image``
    column is relative to; a row whose original is refused falls back to its thumbnail
    (``thumbnails/NAME``). ``max_file_bytes`` refuses larger sources.

    Raises ``ValueError`` for a bad parameter or a missing column. Rows whose file is
    refused are in ``plan.refused``; nothing is written.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}; got {layout!r}")
    frac = parse_sample(sample)
    if frac is not None and (layout == "flat" or imagefolder):
        raise ValueError(f"sample={sample!r} applies to cluster or label folders only, not to "
                         f"{'an ImageFolder' if imagefolder else 'a flat'} export")
    if imagefolder and layout == "flat":
        raise ValueError("an ImageFolder export needs layout 'label' or 'cluster', not 'flat'")
    need = [path_col] + ([cluster_col] if layout == "cluster" else []) + \
        ([label_col] if layout == "label" else [])
    for col in need:
        if col not in df.columns:
            raise ValueError(f"the table has no {col!r} column (needed for layout={layout!r})")
    if image_root is None and not (layout == "flat" and thumb_root is not None):
        raise ValueError("image_root is None: the original images are not known")
    root = None if image_root is None else Path(image_root)
    if root is not None and not root.is_dir() and not is_archive_root(root):
        raise ValueError(f"image_root is not a folder (nor a zip or tar file): {root}")

    paths = df[path_col].fillna("").astype(str).tolist()
    plan = ExportPlan(export_path=[""] * len(paths))

    resolve = None if root is None else resolver(root, must_be_image=True,
                                                   max_bytes=max_file_bytes)

    def source(rel: str) -> Path | Refused:
        if resolve is None:
            return Refused(rel, "no_root", "the original image folder is not known")
        try:
            return resolve(rel)
        except UnsafePath as exc:
            return Refused(rel, exc.reason, str(exc))

    if layout == "flat":
        _plan_flat(plan, df, paths, source, thumb_root, image_col, max_file_bytes)
        return plan

    from explorer.curation.labels import DISCARD

    raw = _group_keys(df, layout, cluster_col, label_col)
    discarded = (df[label_col].fillna("").astype(str) == DISCARD).to_numpy() \
        if label_col in df.columns else np.zeros(len(df), bool)
    keys = [k for k in dict.fromkeys(raw) if k is not None]
    if layout == "cluster":
        keys.sort(key=lambda k: int(k.split("_")[1]))
    else:
        keys.sort()
    if layout == "label" and skip_discard:
        keys = [k for k in keys if k != DISCARD]
    if imagefolder:
        none_folder = UNLABELLED if layout == "label" else OUTLIERS
        reserved = (LABELS_CSV, MANIFEST) + (() if skip_unlabelled else (none_folder,))
    else:
        none_folder = OUTLIERS
        reserved = (OUTLIERS, SAMPLE, MANIFEST)
    plan.folder_of = folder_names(keys, reserved=reserved)

    used: dict[str, set[str]] = {}
    groups: dict[str, list[int]] = {}
    name_of: dict[int, str] = {}
    for r, (rel, key) in enumerate(zip(paths, raw)):
        if imagefolder and key is None and skip_unlabelled:
            plan.skipped_unlabelled += 1
            continue
        if skip_discard and discarded[r]:
            plan.skipped_discard += 1  # a discarded image (e.g. a duplicate not kept) stays out
            continue
        src = source(rel)
        if isinstance(src, Refused):
            plan.refused.append(src)
            continue
        folder = none_folder if key is None else plan.folder_of[key]
        name = unique_file(used.setdefault(folder, set()), rel)
        if name != safe_name(PurePosixPath(rel).name, default="image"):
            plan.renamed += 1
        arc = f"{folder}/{name}"
        plan.entries.append((arc, src))
        plan.rows.append(r)
        plan.export_path[r] = arc
        plan.folders[folder] = plan.folders.get(folder, 0) + 1
        cls = "" if key is None else key  # "" = no label / noise, never merged with a label
        plan.classes[cls] = plan.classes.get(cls, 0) + 1
        groups.setdefault(folder, []).append(r)
        name_of[r] = name
    plan.originals = len(plan.entries)
    if frac is not None:
        src_of = dict(zip(plan.rows, (s for _, s in plan.entries)))
        for folder, rows in _sample_rows(groups, frac, seed).items():
            for r in rows:
                plan.entries.append((f"{SAMPLE}/{folder}/{name_of[r]}", src_of[r]))
                plan.rows.append(r)
                plan.sampled.add(r)
                plan.sample_folders[folder] = plan.sample_folders.get(folder, 0) + 1
    return plan


def _plan_flat(plan: ExportPlan, df: pd.DataFrame, paths: list[str], source: Callable,
               thumb_root, image_col: str, max_file_bytes: int | None) -> None:
    """The selection layout: each original under its own (safe) relative path."""
    used: set[str] = set()
    thumbs = df[image_col].fillna("").astype(str).tolist() if (
        thumb_root is not None and image_col in df.columns) else None
    for r, rel in enumerate(paths):
        src = source(rel)
        if not isinstance(src, Refused):
            parts = [safe_name(p, default="image") for p in rel.replace("\\", "/").split("/")
                     if p not in ("", ".")]
            arc = _unique_arc(used, "/".join(parts) or "image")
            plan.originals += 1
        else:
            thumb = _thumbnail(thumb_root, thumbs[r], max_file_bytes) if thumbs else None
            if thumb is None:
                plan.refused.append(src)
                continue
            arc = _unique_arc(used, f"{THUMBNAILS}/{safe_name(thumb.name, default='image')}")
            plan.thumbnails += 1
            src = thumb
        plan.entries.append((arc, src))
        plan.rows.append(r)
        plan.export_path[r] = arc
        top = arc.split("/", 1)[0] if "/" in arc else ""
        plan.folders[top] = plan.folders.get(top, 0) + 1


def _thumbnail(thumb_root, value: str, max_file_bytes: int | None) -> Path | None:
    if not is_app_relative_url(value):
        return None
    try:
        return resolve_under(thumb_root, value.split("?", 1)[0].split("#", 1)[0], must_be_image=True,
                             max_bytes=max_file_bytes)
    except UnsafePath:
        return None


# --------------------------------------------------------------------------- reading sources
def _open_source(src: Path | Member) -> tuple[IO[bytes], os.stat_result]:
    """Open a planned source for reading without following a symlink swapped in since the
    plan (``O_NOFOLLOW`` where the OS has it); only regular files. An archive member (an
    image root that is a zip or tar file) is read into memory (one image at a time), with
    the archive's times."""
    if isinstance(src, Member):
        import io

        try:
            data = src.read()
        except ValueError as exc:  # archives.MemberError: damaged, gone, a lying header
            raise OSError(str(exc)) from None
        a = os.stat(src.archive)
        st = os.stat_result(
            (stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, len(data), int(a.st_atime), int(a.st_mtime),
             int(a.st_ctime)),
            {k: getattr(a, k) for k in ("st_atime", "st_mtime", "st_ctime", "st_atime_ns",
                                        "st_mtime_ns", "st_ctime_ns")})
        return io.BytesIO(data), st
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(src, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{src} is no longer a regular file")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------- zip
@dataclass
class ZipReport:
    """What :func:`write_zip` wrote: ``files`` entries, ``bytes_in`` source bytes;
    ``failed`` (arcname, reason) for sources that could not be read; ``left_out`` the
    arcnames not written because ``max_bytes`` was reached (then ``capped`` is True)."""

    files: int = 0
    bytes_in: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    capped: bool = False


def write_zip(entries: Iterable[tuple[str, Any]], fileobj: IO[bytes], *,
              max_bytes: int | None = None,
              on_progress: Callable[[int, int | None], Any] | None = None,
              extra: dict[str, str | bytes] | None = None) -> ZipReport:
    """Stream ``entries`` into a zip written to the binary file object ``fileobj``.

    ``entries``: ``(arcname, source)`` pairs; ``source`` is a file path (a planned, resolved
    source: see :func:`plan_export`) or ``bytes`` (a small generated file: a CSV, a note).
    Files are copied in chunks of :data:`CHUNK` bytes, so memory stays bounded whatever the
    sizes; ``fileobj`` need not be seekable (then sizes go in data descriptors). JPEG, PNG,
    WebP and GIF are stored, anything else deflated. ``max_bytes`` caps the total source bytes:
    an entry that would pass it is left out, with every later one (``report.left_out``), and
    the zip is still complete and valid. ``on_progress(done, total)`` is called after every
    entry (``total`` None if ``entries`` has no length). A source that cannot be read is
    reported in ``report.failed`` and skipped. Arcnames must be relative, without ``..``.
    ``extra`` (``{arcname: text or bytes}``, e.g. ``{"MISSING.txt": plan.refused_note()}``;
    None values are left out) is written after the entries, under the same cap.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None; got {max_bytes!r}")
    try:
        total: int | None = len(entries)  # type: ignore[arg-type]
    except TypeError:
        total = None
    report = ZipReport()
    done = 0
    if extra:
        tail = [(k, v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v)
                for k, v in extra.items() if v is not None]
        entries = _chain(entries, tail)
        total = None if total is None else total + len(tail)
    with zipfile.ZipFile(fileobj, "w", allowZip64=True) as zf:
        for arc, src in entries:
            if not isinstance(arc, str):
                raise TypeError(f"zip entries are (arcname, source) pairs; got an arcname "
                                f"{arc!r} of type {type(arc).__name__}")
            _check_arcname(arc)
            done += 1
            if report.capped:
                report.left_out.append(arc)
                continue
            if isinstance(src, (bytes, bytearray, memoryview)):
                data = bytes(src)
                if max_bytes is not None and report.bytes_in + len(data) > max_bytes:
                    report.capped = True
                    report.left_out.append(arc)
                    continue
                zf.writestr(_zinfo(arc, len(data)), data)
                report.files += 1
                report.bytes_in += len(data)
            else:
                try:
                    fh, st = _open_source(src if isinstance(src, Member) else Path(src))
                except OSError as exc:
                    report.failed.append((arc, f"{type(exc).__name__}: {exc}"))
                    continue
                with fh:
                    if max_bytes is not None and report.bytes_in + st.st_size > max_bytes:
                        report.capped = True
                        report.left_out.append(arc)
                        continue
                    info = _zinfo(arc, st.st_size, st.st_mtime)
                    try:
                        with zf.open(info, "w", force_zip64=st.st_size >= 0x7FFFFFFF) as out:
                            n = 0
                            while True:
                                chunk = fh.read(CHUNK)
                                if not chunk:
                                    break
                                out.write(chunk)
                                n += len(chunk)
                    except OSError as exc:  # a read error mid-file: the entry stays, short
                        report.failed.append((arc, f"{type(exc).__name__}: {exc}"))
                        continue
                report.files += 1
                report.bytes_in += n
            if on_progress is not None:
                on_progress(done, total)
    return report


def _chain(a: Iterable, b: Iterable):
    yield from a
    yield from b


def _check_arcname(arc: str) -> None:
    parts = arc.split("/")
    if not arc or arc.startswith("/") or "\\" in arc or ".." in parts or ":" in parts[0]:
        raise ValueError(f"zip entry name {arc!r} must be a relative POSIX path without '..'")


def _zinfo(arc: str, size: int, mtime: float | None = None) -> zipfile.ZipInfo:
    import time

    t = time.localtime(mtime) if mtime is not None else time.localtime()
    info = zipfile.ZipInfo(arc, date_time=tuple(max(v, m) for v, m in zip(t[:6], (1980, 1, 1,
                                                                                  0, 0, 0))))
    stored = PurePosixPath(arc).suffix.lower() in STORED_SUFFIXES
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.file_size = size
    return info


def write_zip_file(entries: Iterable[tuple[str, Any]], dest: str | os.PathLike, *,
                   max_bytes: int | None = None,
                   on_progress: Callable[[int, int | None], Any] | None = None) -> ZipReport:
    """:func:`write_zip` to the path ``dest``: written under a temporary name beside it and
    moved into place at the end (normal permissions, durable), never replacing a file that
    exists (``FileExistsError``, before or after the work)."""
    from explorer.table import default_file_mode, fsync_dir

    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists; choose a new name (nothing was overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        os.fchmod(fd, default_file_mode()) if hasattr(os, "fchmod") else None
        with os.fdopen(fd, "wb") as fh:
            report = write_zip(entries, fh, max_bytes=max_bytes, on_progress=on_progress)
            fh.flush()
            os.fsync(fh.fileno())
        _finish(Path(tmp), dest, is_dir=False)
        fsync_dir(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def _finish(tmp: Path, dest: Path, *, is_dir: bool) -> None:
    """Move a finished export to ``dest`` without replacing anything that appeared there."""
    if is_dir:
        if dest.is_dir() and not dest.is_symlink():
            try:
                dest.rmdir()  # only succeeds if it is still empty
            except OSError:
                raise FileExistsError(f"{dest} is no longer empty; nothing was overwritten")
        elif dest.exists() or dest.is_symlink():
            raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten")
        os.rename(tmp, dest)
        return
    try:  # os.link fails if dest exists: never replaces a file that appeared meanwhile
        os.link(tmp, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten") from None
    except OSError:  # no hard links here (some network and FAT filesystems)
        if dest.exists():
            raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten")
        os.rename(tmp, dest)
        return
    os.unlink(tmp)


# --------------------------------------------------------------------------- folders
def _copy(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        if isinstance(src, Member):
            raise ValueError(f"{src.name} lies inside {src.archive}: it cannot be linked to; "
                             "export with --copy")
        os.symlink(src, dst)  # raises FileExistsError rather than replace
        return
    fi, st = _open_source(src)
    with fi, open(dst, "xb") as fo:  # "x": never overwrite
        shutil.copyfileobj(fi, fo, CHUNK)
    try:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass


def _progress_cb(enabled: bool, what: str):
    """An ``on_progress`` callback driving :func:`explorer.progress.track`, or None."""
    if not enabled:
        return None, None
    state: dict[str, Any] = {}

    def cb(done: int, total: int | None) -> None:
        if "it" not in state:  # track advances when asked for the next item
            state["it"] = track(iter(int, 1), what, True, total=total)
            next(state["it"])
        next(state["it"])

    def close() -> None:
        if "it" in state:
            state["it"].close()

    return cb, close


def _zip_with_progress(entries, dest: Path, progress: bool, what: str,
                       max_bytes: int | None = None) -> ZipReport:
    cb, close = _progress_cb(progress, what)
    try:
        return write_zip_file(entries, dest, max_bytes=max_bytes, on_progress=cb)
    finally:
        if close:
            close()


def _check_options(by: str, mode: str, as_zip: bool) -> None:
    """The folder and ImageFolder exports' shared parameter checks (ValueError naming the value)."""
    if by not in ("cluster", "label"):
        raise ValueError(f"by must be 'cluster' or 'label'; got {by!r}")
    if mode not in ("copy", "link"):
        raise ValueError(f"mode must be 'copy' or 'link'; got {mode!r}")
    if as_zip and mode == "link":
        raise ValueError("mode='link' cannot be used with a zip (a zip holds copies)")


def export_folders(df: pd.DataFrame, image_root: str | os.PathLike, to: str | os.PathLike, *,
                   by: str = "cluster", sample: float | str | None = None, mode: str = "copy",
                   seed: int = 42, as_zip: bool = False, progress: bool = True) -> dict[str, Any]:
    """Copy (or link, or zip) every image of ``df`` into one folder per cluster or label.

    Writes ``to/cluster_0/...`` (or one folder per label), ``to/outliers/...``, with
    ``sample`` also ``to/sample/<folder>/...``, and ``to/manifest.csv`` (source path, folder,
    file name, sampled, and the cluster's name where the table has ``cluster_name``). With
    ``as_zip`` the same tree goes into the zip ``to`` (``.zip`` is added if missing) under one
    top folder named after it. ``df`` follows
    :mod:`explorer.table` (``path`` relative to ``image_root``). Returns a summary::

        {"to", "by", "mode", "sample", "seed", "folders": {folder: n}, "sample_folders",
         "written", "missing": [path], "errors": [(path, reason)], "manifest"}

    ``errors`` lists refused sources (outside the image folder, not an image, unreadable).
    Raises ValueError for bad parameters or a missing column and FileExistsError (before
    writing anything) if a file it would write already exists.
    """
    _check_options(by, mode, as_zip)
    frac = parse_sample(sample)
    to = Path(to)
    if as_zip and to.suffix.lower() != ".zip":
        to = to.with_name(to.name + ".zip")
    if as_zip and (to.exists() or to.is_symlink()):
        raise FileExistsError(f"{to} already exists; choose a new name (nothing was overwritten)")
    plan = plan_export(df, image_root, layout=by, sample=frac, seed=seed)
    paths = df["path"].fillna("").astype(str).tolist()
    errors = [(r.path, r.message) for r in plan.refused if r.reason not in
              ("missing", "not_file", "empty")]
    missing = plan.missing

    # the build's cluster names (issue 10) travel with the files they name
    names = (df["cluster_name"].fillna("").astype(str).tolist()
             if "cluster_name" in df.columns else None)
    columns = ["path", "folder", "file", "sampled"] + (["cluster_name"] if names else [])

    def manifest(written_rows: set[int] | None = None) -> bytes:
        rows = [{"path": paths[r], "folder": arc.split("/", 1)[0], "file": arc.rsplit("/", 1)[1],
                 "sampled": r in plan.sampled, **({"cluster_name": names[r]} if names else {})}
                for (arc, _), r in zip(plan.entries, plan.rows)
                if not arc.startswith(SAMPLE + "/") and (written_rows is None or r in written_rows)]
        return pd.DataFrame(rows, columns=columns).to_csv(
            index=False).encode("utf-8", "surrogateescape")

    summary = {"to": str(to), "by": by, "mode": "zip" if as_zip else mode, "sample": frac,
               "seed": int(seed)}
    if as_zip:
        top = safe_name(to.stem, default="export")
        entries = [(f"{top}/{arc}", src) for arc, src in plan.entries]
        entries.append((f"{top}/{MANIFEST}", manifest()))
        rep = _zip_with_progress(entries, to, progress, f"zipping {to.name}")
        by_arc = {f"{top}/{arc}": paths[r] for (arc, _), r in zip(plan.entries, plan.rows)}
        errors += [(by_arc.get(a, a), reason) for a, reason in rep.failed]
        written = rep.files - 1
        folders, sample_folders = plan.folders, plan.sample_folders
        man_path = f"{top}/{MANIFEST}"
    else:
        jobs = [(to / arc, src, r) for (arc, src), r in zip(plan.entries, plan.rows)]
        clash = [str(d) for d, _, _ in jobs if os.path.lexists(d)]
        if os.path.lexists(to / MANIFEST):
            clash.insert(0, str(to / MANIFEST))
        if clash:
            more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
            raise FileExistsError(f"export would overwrite {', '.join(clash[:3])}{more}; "
                                  "choose an empty destination folder")
        folders, sample_folders = {}, {}
        written, ok_rows = 0, set()
        for dst, src, r in track(jobs, f"Export to {to}", progress):
            try:
                _copy(src, dst, mode)
            except FileExistsError:
                errors.append((paths[r], f"{dst} appeared during the export; left as it was"))
                continue
            except OSError as exc:
                errors.append((paths[r], f"{type(exc).__name__}: {exc}"))
                continue
            written += 1
            top = dst.relative_to(to).parts
            if top[0] == SAMPLE:
                sample_folders[top[1]] = sample_folders.get(top[1], 0) + 1
            else:
                folders[top[0]] = folders.get(top[0], 0) + 1
                ok_rows.add(r)
        from explorer.table import atomic_write_bytes

        to.mkdir(parents=True, exist_ok=True)
        man_path = str(atomic_write_bytes(to / MANIFEST, manifest(ok_rows)))
    summary.update({"folders": folders, "sample_folders": sample_folders, "written": written,
                    "missing": missing, "errors": errors, "manifest": man_path,
                    "skipped_discard": plan.skipped_discard})
    return summary


def export_imagefolder(df: pd.DataFrame, image_root, dest, *, as_zip: bool = False,
                       by: str = "label", label_col: str = "label",
                       skip_unlabelled: bool = True, skip_discard: bool = True,
                       mode: str = "copy", path_col: str = "path",
                       progress: bool = True) -> dict[str, Any]:
    """Write ``df``'s images as a torchvision ``ImageFolder`` tree (or zip) at ``dest``::

        dest/cat/0001.jpg       one folder per class (label, or cluster with by="cluster")
        dest/dog/...
        dest/labels.csv         the exported rows + ``export_path`` (where each image went)

    With ``as_zip=True`` the tree goes into the zip ``dest`` (``.zip`` added if missing) under
    one top folder named after it, so unzipping never spills files around; ``mode="link"``
    makes symlinks instead of copies (folders only). Rows without a label (or noise, with
    ``by="cluster"``) and ``discard`` are left out unless ``skip_unlabelled`` /
    ``skip_discard`` is False; kept unlabelled rows go to ``unlabelled/`` (a real label named
    "unlabelled" then gets ``unlabelled-2/``) and keep ``""`` as their label in the CSV.

    Returns a summary: ``dest``, ``format``, ``images`` (written), ``classes`` (class ->
    count), ``folders`` (class -> folder name), ``skipped_unlabelled``, ``skipped_discard``,
    ``missing``, ``outside_root`` and ``refused`` ((path, message), every row not exported),
    ``not_loadable`` (exported, but ImageFolder will not load them), ``renamed``,
    ``labels_csv``. Raises ``ValueError`` (bad parameter, missing column, no image to export,
    a missing ``image_root``) and ``FileExistsError`` (``dest`` exists), before writing.
    """
    from explorer.table import default_dir_mode, order_columns

    _check_options(by, mode, as_zip)
    for col in (path_col, label_col if by == "label" else "cluster"):
        if col not in df.columns:
            raise ValueError(f"the table has no {col!r} column; cannot export an ImageFolder")
    root = Path(image_root)
    if not root.is_dir() and not is_archive_root(root):
        raise ValueError(f"image folder not found: {root}")
    dest = Path(dest)
    if as_zip and dest.suffix.lower() != ".zip":
        dest = dest.with_name(dest.name + ".zip")
    if dest.exists() or dest.is_symlink():
        if not (not as_zip and dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
            raise FileExistsError(f"{dest} already exists; choose a new name (nothing was overwritten)")

    plan = plan_export(df, root, layout=by, imagefolder=True, skip_unlabelled=skip_unlabelled,
                       skip_discard=skip_discard, path_col=path_col, label_col=label_col)
    paths = df[path_col].fillna("").astype(str).tolist()
    if not plan.entries:
        why = []
        if plan.skipped_unlabelled:
            why.append(f"{plan.skipped_unlabelled} unlabelled")
        if plan.skipped_discard:
            why.append(f"{plan.skipped_discard} discarded")
        if plan.refused:
            why.append(f"{len(plan.refused)} missing or refused")
        raise ValueError("no labelled image to export" + (f" ({', '.join(why)})" if why else ""))

    out = order_columns(df).copy()
    out["export_path"] = plan.export_path
    csv_bytes = out[out["export_path"] != ""].to_csv(index=False).encode("utf-8", "surrogateescape")
    not_loadable = [paths[r] for (arc, _), r in zip(plan.entries, plan.rows)
                    if PurePosixPath(arc).suffix.lower() not in IMAGEFOLDER_EXTENSIONS]
    dest.parent.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if as_zip:
        top = safe_name(dest.stem, default="imagefolder")
        entries = [(f"{top}/{arc}", src) for arc, src in plan.entries]
        entries.append((f"{top}/{LABELS_CSV}", csv_bytes))
        rep = _zip_with_progress(entries, dest, progress, "zipping the ImageFolder")
        by_arc = {f"{top}/{arc}": paths[r] for (arc, _), r in zip(plan.entries, plan.rows)}
        failed = [by_arc[a] for a, _ in rep.failed if a in by_arc]
    else:
        from explorer.table import fsync_dir

        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it private
        try:
            for (arc, src), r in track(list(zip(plan.entries, plan.rows)),
                                       "copying the ImageFolder", enabled=progress):
                try:
                    _copy(src, tmp / arc, mode)
                except OSError:
                    failed.append(paths[r])
            with open(tmp / LABELS_CSV, "xb") as fh:
                fh.write(csv_bytes)
            _finish(tmp, dest, is_dir=True)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    folder_of = dict(plan.folder_of)
    if "" in plan.classes:
        folder_of[""] = UNLABELLED if by == "label" else OUTLIERS
    return {
        "dest": str(dest),
        "format": "zip" if as_zip else "folder",
        "images": len(plan.entries) - len(failed),
        "classes": plan.classes,
        "folders": {k: v for k, v in folder_of.items() if k in plan.classes},
        "skipped_unlabelled": plan.skipped_unlabelled,
        "skipped_discard": plan.skipped_discard,
        "missing": plan.missing + failed,
        "outside_root": plan.outside,
        "refused": [(r.path, r.message) for r in plan.refused],
        "not_loadable": not_loadable,
        "renamed": plan.renamed,
        "labels_csv": (f"{safe_name(dest.stem, default='imagefolder')}/{LABELS_CSV}"
                       if as_zip else str(dest / LABELS_CSV)),
    }



def with_predictions(df: pd.DataFrame, predictions: pd.DataFrame, min_confidence: float, *,
                     path_col: str = "path", label_col: str = "label") -> pd.DataFrame:
    """A copy of ``df`` whose unlabelled rows take their predicted label when its confidence
    is at least ``min_confidence`` (``export --by label --min-confidence X``).

    ``predictions`` has ``path``, ``predicted_label`` and ``confidence`` (as from
    :func:`explorer.curation.active.label_table`); a person's labels are never replaced.
    """
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1]; got {min_confidence!r}")
    for col in ("path", "predicted_label", "confidence"):
        if col not in predictions.columns:
            raise ValueError(f"the predictions have no {col!r} column")
    out = df.copy()
    have = (out[label_col].fillna("").astype(str) if label_col in out.columns
            else pd.Series([""] * len(out), index=out.index))
    pred = predictions.set_index("path")
    keys = out[path_col].astype(str)
    conf = keys.map(pred["confidence"]).astype(float)
    lab = keys.map(pred["predicted_label"]).fillna("").astype(str)
    take = (have == "") & (conf >= min_confidence) & (lab != "")
    out[label_col] = have.where(~take, lab)
    return out


# --------------------------------------------------------------------------- one-file formats
#: the column that holds each row's vector in a Parquet export
VECTOR_COLUMN = "vector"
#: the metadata file of a Hugging Face ``imagefolder`` export (its file name column: HF_FILE_NAME)
HF_METADATA = "metadata.csv"


def export_parquet(df: pd.DataFrame, dest: str | os.PathLike,
                   vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``df`` (every column: the table, labels, cluster names, predictions and metadata
    columns where it has them) and, when given, one ``vector`` (a list of float32) per row
    into the single Parquet file ``dest``, which ``pandas.read_parquet`` and
    ``pyarrow.parquet.read_table`` read. No image is copied. ``vectors`` has one row per
    row of ``df``. Written under a temporary name and moved into place; ``FileExistsError``
    if ``dest`` exists. Returns ``{"dest", "format", "rows", "columns", "vector_dim"}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from explorer.table import order_columns

    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists; choose a new name (nothing was overwritten)")
    out = order_columns(df).reset_index(drop=True)
    if VECTOR_COLUMN in out.columns:
        raise ValueError(f"the table already has a {VECTOR_COLUMN!r} column")
    tab = pa.Table.from_pandas(out, preserve_index=False)
    dim = None
    if vectors is not None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(out):
            raise ValueError(f"vectors must be ({len(out)}, D); got shape {vectors.shape}")
        dim = int(vectors.shape[1])
        flat = pa.array(vectors.reshape(-1), pa.float32())
        tab = tab.append_column(VECTOR_COLUMN, pa.FixedSizeListArray.from_arrays(flat, dim))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    try:
        pq.write_table(tab, tmp)
        _finish(Path(tmp), dest, is_dir=False)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"dest": str(dest), "format": "parquet", "rows": len(out),
            "columns": list(tab.column_names), "vector_dim": dim}


def export_hf(df: pd.DataFrame, image_root: str | os.PathLike, dest: str | os.PathLike, *,
              label_col: str = "label", progress: bool = True) -> dict[str, Any]:
    """Write ``df``'s images as a Hugging Face ``imagefolder`` dataset at the folder ``dest``::

        dest/<path>            each image under its own relative path (made safe, unique)
        dest/metadata.csv      file_name (relative to dest), label and every other column

    so that ``datasets.load_dataset("imagefolder", data_dir=dest)`` loads one ``train``
    split with an ``image`` column, the ``label`` text and the metadata. The table's own
    ``image`` column (the thumbnail URL) is written as ``thumbnail``. Sources follow the one
    path rule (:func:`plan_export`: images inside the image folder or archive only); refused
    rows are left out and listed. Returns ``{"dest", "format", "images", "labelled",
    "refused", "metadata"}``; ``FileExistsError`` when ``dest`` exists and is not empty.
    """
    from explorer.table import default_dir_mode, fsync_dir, order_columns

    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
            raise FileExistsError(f"{dest} already exists; choose a new name (nothing was overwritten)")
    plan = plan_export(df, image_root, layout="flat")
    if not plan.entries:
        raise ValueError(f"no image to export ({len(plan.refused)} missing or refused)")
    table = order_columns(df).reset_index(drop=True)
    meta = table.iloc[plan.rows].copy()
    meta = meta.rename(columns={"image": "thumbnail"})
    if HF_FILE_NAME in meta.columns:
        meta = meta.rename(columns={HF_FILE_NAME: f"meta_{HF_FILE_NAME}"})
    meta.insert(0, HF_FILE_NAME, [arc for arc, _ in plan.entries])
    if label_col in meta.columns:
        meta[label_col] = meta[label_col].fillna("").astype(str)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    os.chmod(tmp, default_dir_mode())
    failed: list[str] = []
    try:
        for (arc, src), r in track(list(zip(plan.entries, plan.rows)), "copying the dataset",
                                   enabled=progress):
            try:
                _copy(src, tmp / arc, "copy")
            except OSError:
                failed.append(arc)
        if failed:
            meta = meta[~meta[HF_FILE_NAME].isin(failed)]
        with open(tmp / HF_METADATA, "xb") as fh:
            fh.write(meta.to_csv(index=False).encode("utf-8", "surrogateescape"))
        _finish(tmp, dest, is_dir=True)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    labelled = int((meta[label_col] != "").sum()) if label_col in meta.columns else 0
    return {"dest": str(dest), "format": "hf", "images": len(meta), "labelled": labelled,
            "refused": [(r.path, r.message) for r in plan.refused]
            + [(a, "cannot read") for a in failed],
            "metadata": str(dest / HF_METADATA)}
