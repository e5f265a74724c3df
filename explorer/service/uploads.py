"""Taking images in from strangers: multipart uploads streamed to disk, zips, downloads.

Everything lands in one dataset's ``images/`` folder and nowhere else:

* names are rebuilt from safe components (:func:`safe_relpath`): no absolute paths, drives,
  ``..``, control characters, reserved or hidden names; a clash gets ``-2``, ``-3``, ...;
* a file must open as an image in one of the formats the build reads (the header is checked
  and the image verified; decompression bombs by pixel count are refused);
* zips: members are extracted by streaming with the real byte count checked, never trusting
  the declared sizes; symlinks, nested archives and non-images are skipped; a member whose
  compression ratio is above ``max_zip_ratio`` is skipped; a zip whose members add up to
  more than ``max_zip_total`` bytes is refused as a whole;
* every file gets a line in the report: ``{"name", "ok", "file"}`` or ``{"name", "ok":
  false, "error"}``.
"""

from __future__ import annotations

import os
import shutil
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: PIL format -> the suffix a stored file gets when its own suffix is not an image suffix
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif",
           "TIFF": ".tif", "MPO": ".jpg"}
MAX_DEPTH = 8


@dataclass(frozen=True)
class Limits:
    """Caps for what the service takes in (bytes unless said otherwise)."""

    max_file_bytes: int = 50 * 2**20
    max_request_bytes: int = 2 * 2**30
    max_zip_total: int = 4 * 2**30
    max_zip_ratio: float = 100.0
    max_zip_entries: int = 200_000
    max_pixels: int = 100_000_000
    max_files: int = 200_000

    def __post_init__(self):
        for k, v in self.__dict__.items():
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"limit {k} must be a positive number, got {v!r}")


class RequestTooLarge(ValueError):
    """The request body is larger than ``Limits.max_request_bytes``."""


def _safe_name(part: str) -> str:
    from explorer.curation.exports import safe_name

    return safe_name(part, default="unnamed", max_len=100)


def safe_relpath(name: str) -> str | None:
    """A safe relative POSIX path for an uploaded or zipped file name, or None if nothing is
    left of it. Separators ``/`` and ``\\`` split components; ``..``, ``.``, empty parts and
    drive letters are dropped; each component is made filesystem-safe."""
    if not isinstance(name, str):
        return None
    parts = []
    for p in name.replace("\\", "/").split("/"):
        p = p.strip()
        if p in ("", ".", "..") or (len(p) == 2 and p[1] == ":"):
            continue
        parts.append(_safe_name(p))
    if not parts:
        return None
    return "/".join(parts[-MAX_DEPTH:])


def image_format(path: Path, max_pixels: int) -> str:
    """The PIL format of the image at ``path``; raises ValueError saying why it is not one."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"{w}x{h} pixels is more than the limit of {max_pixels:,}")
                im.verify()
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise ValueError(f"not an image this service reads ({type(exc).__name__})") from None
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt} is not one the build reads "
                         f"({', '.join(sorted(set(FORMATS) - {'MPO'}))})")
    return fmt


class Intake:
    """Adds files to ``images`` (a dataset's image folder), with a report line for each."""

    def __init__(self, images: Path, limits: Limits = Limits()):
        self.images = Path(images)
        self.images.mkdir(parents=True, exist_ok=True)
        self.base = self.images.resolve()
        self.limits = limits
        self.report: list[dict] = []
        self.added = 0

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.report if not r["ok"])

    def skip(self, name: str, why: str) -> None:
        self.report.append({"name": name, "ok": False, "error": why})

    def _target(self, rel: str, fmt: str) -> Path:
        p = PurePosixPath(rel)
        ext = p.suffix.lower()
        if ext.lstrip(".") not in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"):
            p = p.with_name(p.name + FORMATS[fmt])
        target = self.base.joinpath(*p.parts)
        stem, suffix = target.stem, target.suffix
        n = 2
        while os.path.lexists(target):
            target = target.with_name(f"{stem}-{n}{suffix}")
            n += 1
        # the rebuilt name has no '..' and no absolute part; check the result anyway
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not parent.resolve().is_relative_to(self.base):
            raise ValueError("the name leads outside the dataset folder")
        return target

    def _place(self, tmp: Path, rel: str, fmt: str) -> Path:
        """Move ``tmp`` to a free name for ``rel``. ``os.link`` fails when the name exists, so
        a file another request placed between the check and the move is never overwritten
        (review 2026-12-06 section 1.4); the next free name is taken instead."""
        for _ in range(1000):
            target = self._target(rel, fmt)
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            os.unlink(tmp)
            return target
        raise ValueError(f"no free file name for {rel!r}")

    def add_file(self, tmp: Path, name: str) -> None:
        """Take the staged file ``tmp`` (uploaded as ``name``); it is moved or deleted."""
        try:
            if self.added >= self.limits.max_files:
                return self.skip(name, f"more than {self.limits.max_files:,} files")
            rel = safe_relpath(name)
            if rel is None:
                return self.skip(name, "the file name is empty once unsafe parts are removed")
            size = tmp.stat().st_size
            if size == 0:
                return self.skip(name, "empty file")
            if size > self.limits.max_file_bytes:
                return self.skip(name, f"{size:,} bytes is more than the limit of "
                                       f"{self.limits.max_file_bytes:,}")
            try:
                fmt = image_format(tmp, self.limits.max_pixels)
                target = self._place(tmp, rel, fmt)
            except ValueError as exc:
                return self.skip(name, str(exc))
            self.added += 1
            self.report.append({"name": name, "ok": True,
                                "file": target.relative_to(self.base).as_posix()})
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def add_zip(self, tmp: Path, name: str) -> None:
        """Extract the images of the staged zip ``tmp`` (then deleted)."""
        try:
            self._add_zip(tmp, name)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def _add_zip(self, tmp: Path, name: str) -> None:
        lim = self.limits
        try:
            zf = zipfile.ZipFile(tmp)
        except (zipfile.BadZipFile, OSError) as exc:
            return self.skip(name, f"not a readable zip ({exc})")
        with zf:
            infos = zf.infolist()
            if len(infos) > lim.max_zip_entries:
                return self.skip(name, f"{len(infos):,} entries is more than the limit of "
                                       f"{lim.max_zip_entries:,}; nothing extracted")
            total = sum(i.file_size for i in infos)
            if total > lim.max_zip_total:
                return self.skip(name, f"the zip would unpack to {total:,} bytes, more than "
                                       f"the limit of {lim.max_zip_total:,}; nothing extracted")
            if _overlapping(infos, zf.start_dir):
                return self.skip(name, "members overlap one another (a zip bomb that reuses "
                                       "its data); nothing extracted")
            members = [i for i in infos if not i.is_dir()]
            if not members:
                return self.skip(name, "the zip holds no files")
            unpacked = 0
            for info in members:
                label = f"{name}:{info.filename}"
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    self.skip(label, "symbolic link; skipped")
                    continue
                if info.flag_bits & 0x1:
                    self.skip(label, "encrypted; skipped")
                    continue
                if info.file_size > lim.max_file_bytes:
                    self.skip(label, f"{info.file_size:,} bytes is more than the limit of "
                                     f"{lim.max_file_bytes:,}")
                    continue
                ratio = info.file_size / max(1, info.compress_size)
                if ratio > lim.max_zip_ratio:
                    self.skip(label, f"compression ratio {ratio:,.0f}:1 is above the limit "
                                     f"of {lim.max_zip_ratio:,.0f}:1 (zip bomb?)")
                    continue
                staged = self.images / f".part-{os.getpid()}-{self.added}-{len(self.report)}"
                n = 0
                too_big = False
                try:
                    with zf.open(info) as src, open(staged, "wb") as dst:
                        while True:
                            chunk = src.read(1 << 16)
                            if not chunk:
                                break
                            n += len(chunk)
                            if n > info.file_size or n > lim.max_file_bytes or \
                                    unpacked + n > lim.max_zip_total:
                                too_big = True
                                break
                            dst.write(chunk)
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError,
                        NotImplementedError) as exc:
                    if staged.exists():
                        staged.unlink()
                    self.skip(label, f"cannot be extracted ({type(exc).__name__}: {exc})")
                    continue
                if too_big:
                    staged.unlink()
                    self.skip(label, "unpacks to more bytes than it declares or than the "
                                     "limits allow (zip bomb?)")
                    continue
                unpacked += n
                self.add_file(staged, info.filename)


def _overlapping(infos: list[zipfile.ZipInfo], start_dir: int) -> bool:
    """True if the members' stored bytes overlap (review 2026-12-06 section 1.4: an
    overlapping-entry zip makes many members from one compressed kernel, so the per-member
    ratio check sees small ratios while the inflate work and the bytes written add up)."""
    spans = sorted((i.header_offset, i.header_offset + 30 + i.compress_size) for i in infos)
    ends = [s for s, _ in spans[1:]] + [start_dir]
    return any(end > nxt for (_, end), nxt in zip(spans, ends))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- multipart
async def receive_multipart(request, staging: Path, limits: Limits,
                            max_field_bytes: int = 4096, *, skipped: list | None = None
                            ) -> tuple[dict[str, str], list[tuple[Path, str]]]:
    """Stream a ``multipart/form-data`` body to files in ``staging``.

    Returns (text fields, [(staged file, uploaded name), ...]). Raises
    :class:`RequestTooLarge` when the body passes ``limits.max_request_bytes``, and
    ``ValueError`` for a body that is not multipart. A file (not a zip) that passes
    ``limits.max_file_bytes`` stops being written as soon as it does and its staged part is
    deleted: with a ``skipped`` list it is left out of the files and ``(name, why)`` is
    appended there (the rest of the request is read on); without one, RequestTooLarge.
    Parsing runs in a worker thread, a chunk at a time, so the event loop keeps serving
    other requests.
    """
    import anyio
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise ValueError("send the files as multipart/form-data")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise RequestTooLarge(f"the upload is {int(declared):,} bytes, more than the limit of "
                              f"{limits.max_request_bytes:,}")
    staging.mkdir(parents=True, exist_ok=True)
    fields: dict[str, str] = {}
    files: list[tuple[Path, str]] = []
    state: dict = {"headers": {}, "field": b"", "value": b"", "out": None, "name": None,
                   "filename": None, "buf": bytearray(), "n": 0, "over": False,
                   "head": b""}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, o = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = o.get(b"name", b"").decode("utf-8", "replace")
        fn = o.get(b"filename")
        state["filename"] = None if fn is None else fn.decode("utf-8", "replace")
        state["n"], state["over"], state["head"] = 0, False, b""
        if state["filename"] is not None:
            if len(files) >= limits.max_files:
                raise RequestTooLarge(f"more than {limits.max_files:,} files in one request")
            path = staging / f"upload-{len(files)}"
            state["out"] = open(path, "wb")
            files.append((path, state["filename"]))
        else:
            state["buf"] = bytearray()

    def on_part_data(data, start, end):
        chunk = data[start:end]
        state["n"] += len(chunk)
        if state["over"]:  # the rest of a file over the cap: read, not written
            return
        if state["out"] is not None:
            if len(state["head"]) < 4:
                state["head"] += chunk[:4 - len(state["head"])]
            is_zip = state["head"] == b"PK\x03\x04"  # zips: their members have the cap
            if state["n"] > limits.max_file_bytes and not is_zip:
                state["over"] = True
            if state["over"]:
                state["out"].close()
                state["out"] = None
                path, name = files.pop()
                path.unlink()
                why = f"more than the limit of {limits.max_file_bytes:,} bytes per file"
                if skipped is None:
                    raise RequestTooLarge(f"file {name!r} is {why}")
                skipped.append((name, why))
                return
            state["out"].write(chunk)
        elif state["n"] > max_field_bytes:
            raise RequestTooLarge(f"form field {state['name']!r} is longer than "
                                  f"{max_field_bytes} bytes")
        else:
            state["buf"] += chunk

    def on_part_end():
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
        elif state["over"]:
            pass
        else:
            fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")
        state["headers"] = {}

    parser = MultipartParser(opts[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise RequestTooLarge(f"the upload is more than the limit of "
                                      f"{limits.max_request_bytes:,} bytes")
            if chunk:
                await anyio.to_thread.run_sync(parser.write, chunk)
        await anyio.to_thread.run_sync(parser.finalize)
    except RequestTooLarge:
        raise
    except Exception as exc:  # python_multipart's parse errors
        raise ValueError(f"the multipart body cannot be read ({type(exc).__name__}: {exc})") from None
    finally:
        if state["out"] is not None:
            state["out"].close()
    return fields, files
