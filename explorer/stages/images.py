"""Find, decode and shrink images: the first stages of the pipeline.

Pure functions (paths in, images / arrays out); nothing here writes files.

- :func:`discover` walks a folder and returns image paths in natural order.
- :func:`decode_image` / :func:`load_image` turn bytes / a file into an RGB ``PIL.Image``
  plus the original (EXIF-rotated) size, or raise :class:`ImageLoadError` with a short
  human reason.
- :func:`load` builds a DocArray ``DocList[ImageDoc]`` for the API and notebooks.
- :func:`thumbnail` and :func:`thumbnail_names` make the app's thumbnails and their
  collision-free, filesystem-safe file names.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from explorer.inputs.archives import Member, MemberError

if TYPE_CHECKING:  # docarray is imported lazily by load()
    from docarray import DocList

#: file extensions (lower case, without dot) that :func:`discover` picks up
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
)

#: EXIF orientations that swap width and height
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class ImageLoadError(ValueError):
    """A file cannot be used as an image. ``reason`` is short and human readable."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class LoadedImage(NamedTuple):
    """What :func:`load_image` returns: ``img, (width, height) = load_image(path)``.

    ``image`` is RGB, possibly decoded smaller than the file (JPEG draft) when a ``size``
    was asked for; ``size`` is always the ORIGINAL ``(width, height)`` after EXIF rotation.
    """

    image: Image.Image
    size: tuple[int, int]


# --------------------------------------------------------------------------- discover
def natural_key(text: str) -> list:
    """Sort key with numbers compared as numbers: ``img2 < img10`` (case-insensitive).

    Same idea as timm's ``reader_image_folder.natural_key``; ``re.split`` with a capturing
    group alternates text / number, so the lists always compare element by element.
    """
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text.lower())]


def _is_image_name(name: str) -> bool:
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in IMAGE_EXTENSIONS


def discover(root: str | os.PathLike, *, contained: bool = False) -> list[Path]:
    """All image files under ``root`` (recursive), in natural order of their relative path.

    Hidden files and folders (name starting with ``.``) are skipped. Symlinked folders are
    followed once (a folder reached twice, e.g. by a symlink loop, is walked only the first
    time). With ``contained`` (what ``explorer serve`` builds use), a file or folder is kept
    only if it resolves, after symlinks, inside ``root``: a symlink that leads out of the
    folder (into another user's folder, the service's data) brings nothing in.
    Returns absolute-or-as-given paths ``root / relpath``; an empty list is allowed.

    Raises ``ValueError`` if ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} is not a directory")
    prefix = os.path.join(os.path.realpath(root), "")

    def inside(path: str) -> bool:
        return not contained or os.path.realpath(path).startswith(prefix)

    found: list[tuple[list, str, Path]] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            continue
        seen_dirs.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # unreadable folder: skip it, keep the rest
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            relname = f"{rel}/{name}" if rel else name
            try:
                if entry.is_dir(follow_symlinks=True):
                    if inside(entry.path):
                        stack.append((Path(entry.path), relname))
                elif _is_image_name(name) and entry.is_file(follow_symlinks=True) and \
                        inside(entry.path):
                    found.append((natural_key(relname), relname, Path(entry.path)))
            except OSError:
                continue
    found.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in found]


# --------------------------------------------------------------------------- decode
def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # broken EXIF must not lose the image
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.ndim == 3:  # some decoders give (h, w, 1)
            arr = arr[..., 0]
        arr = arr.astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            finite = arr[np.isfinite(arr)]
            lo = float(finite.min()) if finite.size else 0.0
            hi = float(finite.max()) if finite.size else 0.0
            if mode == "F" and lo >= 0 and hi <= 1:
                arr = arr * 255.0
            elif lo >= 0 and hi <= 255:
                pass
            elif mode == "I" and lo >= 0 and hi <= 65535:
                arr = arr / 257.0
            elif hi > lo:
                arr = (arr - lo) * (255.0 / (hi - lo))
            else:
                arr = np.zeros_like(arr)
        arr = np.nan_to_num(arr, nan=0.0)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...
    return img.convert("RGB")


def _reason(exc: BaseException) -> str:
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, Image.DecompressionBombError) or "decompression bomb" in low:
        return "decompression bomb: " + msg
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, EOFError) or "truncated" in low or "premature end" in low:
        return "truncated file"
    if isinstance(exc, (SyntaxError, OSError, ValueError)) and (
        "broken" in low or "corrupt" in low or "unexpected end" in low
    ):
        return "truncated file"
    return f"cannot decode ({type(exc).__name__}: {msg})" if msg else "cannot decode"


def decode_image(
    data: bytes,
    size: int | None = None,
    *,
    name: str | os.PathLike | None = None,
    max_pixels: int | None = None,
) -> LoadedImage:
    """Decode image bytes to RGB; see :func:`load_image` (``name`` is used in errors)."""
    if not data:
        raise ImageLoadError(name, "empty file")
    if size is not None and (not isinstance(size, (int, np.integer)) or size <= 0):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        # (no warnings.catch_warnings here: it is not thread-safe and this runs in
        # worker threads; Pillow itself refuses > 2 x MAX_IMAGE_PIXELS)
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if limit is not None and w * h > limit:
            raise ImageLoadError(
                name, f"decompression bomb: {w * h} pixels (limit {int(limit)})"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        orientation = _exif_orientation(img)
        if size is not None and img.format == "JPEG":
            # decode straight to >= size on the shorter side (DCT scaling)
            img.draft("RGB", (int(size), int(size)))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(name, "image too large to decode") from None
    except Exception as exc:  # Pillow raises many kinds; each one is a bad file
        raise ImageLoadError(name, _reason(exc)) from exc
    if orientation in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return LoadedImage(img, (int(w), int(h)))


def content_hash(data: bytes) -> str:
    """The store key of a file: blake2b-128 of its bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_file(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[bytes, str]:
    """Read a file once, hashing it while streaming: ``(data, content_hash(data))``.

    Files larger than ``max_bytes`` are refused before they are read (``os.stat`` first)
    and while reading (a file that grows): ``ImageLoadError("file too large ...")``.
    Other failures: ``ImageLoadError("file not found" / "cannot read (...)")``.
    """
    if isinstance(path, Member):
        data = _member_bytes(path, max_bytes)
        return data, content_hash(data)
    with _reading(path), open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ImageLoadError(path, _too_large(size, max_bytes))
        h = hashlib.blake2b(digest_size=16)
        parts = []
        total = 0
        while block := fh.read(1 << 20):
            total += len(block)
            if max_bytes is not None and total > max_bytes:
                raise ImageLoadError(path, _too_large(total, max_bytes))
            h.update(block)
            parts.append(block)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return data, h.hexdigest()


def _too_large(size: int, limit: int) -> str:
    return f"file too large ({size / 2**20:.1f} MB; limit {limit / 2**20:g} MB, see --max-file-mb)"


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file (or archive :class:`~explorer.inputs.archives.Member`);
    ``ImageLoadError("cannot read: ...")`` if that fails."""
    if isinstance(path, Member):
        return _member_bytes(path, None)
    with _reading(path), open(path, "rb") as fh:
        return fh.read()


def _member_bytes(member: Member, max_bytes: int | None) -> bytes:
    try:
        return member.read(max_bytes)
    except MemberError as exc:
        raise ImageLoadError(member.name, exc.reason) from None


def stat_item(path: str | os.PathLike) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file or an archive member (the embedding cache's key);
    raises ``OSError`` like ``os.stat``."""
    if isinstance(path, Member):
        return path.stat()
    s = os.stat(path)
    return s.st_size, s.st_mtime_ns


@contextmanager
def _reading(path):
    """File errors as ``ImageLoadError`` with a short reason (for errors.csv)."""
    try:
        yield
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read ({exc.strerror or exc})") from None


def load_image(
    path: str | os.PathLike, size: int | None = None, *, max_pixels: int | None = None
) -> LoadedImage:
    """Open one image file as RGB. Returns ``LoadedImage(image, (width, height))``.

    - EXIF orientation is applied; ``(width, height)`` is the original size after it.
    - Palette, alpha (composited on white), CMYK, 16/32-bit, greyscale and LA become RGB.
    - ``size``: the shorter side you need at least. JPEGs are then decoded with DCT
      scaling (``Image.draft``) to the smallest size >= ``size``, so the returned image can
      be smaller than the file; ``None`` decodes at full size.
    - ``max_pixels``: refuse files with more pixels than this (default
      ``PIL.Image.MAX_IMAGE_PIXELS``) with "decompression bomb: N pixels".

    Raises :class:`ImageLoadError` (a ``ValueError``) whose ``reason`` is one of
    "empty file", "not an image", "truncated file", "decompression bomb: ...",
    "file not found", "cannot read (...)", "cannot decode (...)".
    """
    return decode_image(read_bytes(path), size, name=path, max_pixels=max_pixels)


# --------------------------------------------------------------------------- DocArray
def load(
    paths: Sequence[str | os.PathLike],
    root: str | os.PathLike | None = None,
    size: int | None = None,
    progress: bool = True,
) -> tuple["DocList", list[tuple[str, str]]]:
    """Load images into a DocArray ``DocList[ImageDoc]`` (for the API and notebooks).

    Each document has ``url`` = the path as a plain string (relative to ``root``, POSIX
    slashes, when ``root`` is given and the path lies under it; relative paths are
    resolved against ``root``) and ``tensor`` = the RGB ``uint8`` array (H, W, 3).
    Bad files do not stop the loop; they are returned in ``errors`` as ``(path, reason)``.
    Meant for small sets: every decoded image stays in memory. ``progress`` shows a rich
    progress bar (for more than 20 paths).
    """
    from docarray import DocList
    from docarray.documents import ImageDoc

    docs = []
    errors: list[tuple[str, str]] = []
    root_p = Path(root) if root is not None else None
    seq = list(paths)
    if progress and len(seq) > 20:
        from explorer.progress import track

        seq = track(seq, f"Loading {len(seq)} images")
    for p in seq:
        p = Path(p)
        full = root_p / p if (root_p is not None and not p.is_absolute()) else p
        url = str(p)
        if root_p is not None:
            try:
                url = full.relative_to(root_p).as_posix()
            except ValueError:
                url = str(full)
        try:
            img, _ = load_image(full, size)
        except ImageLoadError as exc:
            errors.append((str(full), exc.reason))
            continue
        docs.append(ImageDoc(url=url, tensor=np.asarray(img)))
    return DocList[ImageDoc](docs), errors


# --------------------------------------------------------------------------- thumbnails
def thumbnail(img: Image.Image, max_side: int = 256) -> Image.Image:
    """A copy of ``img`` whose longer side is at most ``max_side`` (aspect kept, RGB)."""
    if not isinstance(max_side, (int, np.integer)) or max_side <= 0:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # antialiased bilinear: looks the same as bicubic at thumbnail size, ~40% cheaper
    return img.resize(size, Image.Resampling.BILINEAR)


_SLUG_BAD = re.compile(r"[^a-z0-9_-]+")
_SLUG_MAX = 48


def _slug(stem: str) -> str:
    ascii_ = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    s = _SLUG_BAD.sub("-", ascii_.lower()).strip("-_")
    s = re.sub(r"-{2,}", "-", s)[:_SLUG_MAX].strip("-_")
    return s or "img"


def _relkey(relpath: str | os.PathLike) -> str:
    return relpath.as_posix() if isinstance(relpath, Path) else str(relpath)


def thumbnail_names(relpaths: Iterable[str | os.PathLike], hash_chars: int = 12) -> list[str]:
    """Safe, unique, deterministic thumbnail file names, one per relative path.

    ``name = <slug of the stem>-<blake2b of the relpath>.jpg``: only ``[a-z0-9_-]`` plus one
    dot, at most ~70 characters, so hostile names (``../x.jpg``, HTML, unicode, very long)
    cannot escape the folder or break a URL, and two ``a.jpg`` in different folders get
    different hashes. The same relpath gives the same name on every run. Should two
    different relpaths ever share a hash prefix, both get a longer hash.
    """
    keys = [_relkey(r) for r in relpaths]

    def name(key: str, n: int) -> str:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16)
        stem = key.rsplit("/", 1)[-1]
        stem = stem.rsplit(".", 1)[0] if "." in stem else stem
        return f"{_slug(stem)}-{digest.hexdigest()[:n]}.jpg"

    names = [name(k, hash_chars) for k in keys]
    owner: dict[str, str] = {}
    clash: set[str] = set()
    for k, n in zip(keys, names):
        if n in owner and owner[n] != k:
            clash.add(n)
        owner.setdefault(n, k)
    if clash:
        names = [name(k, 32) if n in clash else n for k, n in zip(keys, names)]
    return names
