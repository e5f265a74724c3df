"""Exports handed to the one session that asked for them (never published under ``static/``).

A saved CSV or zip is written into a private per-process folder (a temporary directory, or
``$EXPLORER_EXPORT_DIR``) and registered in the :class:`DownloadStore` under a random,
unguessable token together with the *key* of the session that saved it. The browser fetches
it from ``/<route>/_exports/<token>/<file name>`` (served by :class:`DownloadHandler`, a Tornado
handler that ``app_hooks.on_server_loaded`` adds to the ``bokeh serve`` application), and must
send the session's key in a cookie scoped to that one path. The key reaches the browser only
over the session's own websocket, so a leaked URL is refused to anyone else.

Every export has a size cap (:data:`MAX_EXPORT_BYTES`, ``$EXPLORER_EXPORT_MAX_BYTES``), the
store a total cap (:data:`MAX_TOTAL_BYTES`, ``$EXPLORER_EXPORT_TOTAL_BYTES``), and each file an
expiry (:data:`TTL_SECONDS`, ``$EXPLORER_EXPORT_TTL``): after it, or when its session ends,
the file is deleted and its URL answers 404.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import numpy as np
import pandas as pd

from explorer.app.files import ExportError

log = logging.getLogger("bokeh.server.explorer")

__all__ = [
    "COOKIE",
    "Download",
    "DownloadStore",
    "ExportPlan",
    "ExportTooLarge",
    "SaveResult",
    "describe",
    "install",
    "store",
    "write_export",
]

#: name of the cookie that carries the session key (one cookie per download path)
COOKIE = "explorer_dl"
#: URL segment under the app route
URL_SEGMENT = "_exports"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(float(raw)) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


MAX_EXPORT_BYTES = 4 << 30
MAX_TOTAL_BYTES = 16 << 30
TTL_SECONDS = 3600


class ExportTooLarge(ValueError):
    """An export would exceed the per-export or total size cap."""


@dataclass
class Download:
    """One registered export file."""

    token: str
    owner: str
    path: Path
    name: str
    route: str
    expires: float
    size: int = 0

    @property
    def url(self) -> str:
        prefix = f"/{quote(self.route)}" if self.route else ""
        return f"{prefix}/{URL_SEGMENT}/{self.token}/{quote(self.name)}"

    @property
    def cookie_path(self) -> str:
        prefix = f"/{quote(self.route)}" if self.route else ""
        return f"{prefix}/{URL_SEGMENT}/{self.token}/"


class CappedWriter:
    """A write-only binary file that raises :class:`ExportTooLarge` past ``limit`` bytes."""

    def __init__(self, f: BinaryIO, limit: int, what: str) -> None:
        self._f, self._limit, self._what, self._n = f, limit, what, 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if self._n + n > self._limit:
            raise ExportTooLarge(
                f"{self._what} would be larger than the export limit of {self._limit:,} bytes "
                "(select fewer images, or raise EXPLORER_EXPORT_MAX_BYTES)"
            )
        self._n += n
        return self._f.write(data)

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        self._f.flush()

    def seekable(self) -> bool:  # zipfile then writes data descriptors, streaming
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the owner closes the real file
        pass

    @property
    def written(self) -> int:
        return self._n


class DownloadStore:
    """Export files of one server process, each owned by one session key (thread-safe)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        ttl: float | None = None,
        max_export_bytes: int | None = None,
        max_total_bytes: int | None = None,
    ) -> None:
        self._root = Path(root) if root is not None else None
        self.ttl = float(ttl if ttl is not None else _env_int("EXPLORER_EXPORT_TTL", TTL_SECONDS))
        self.max_export_bytes = int(max_export_bytes or _env_int("EXPLORER_EXPORT_MAX_BYTES", MAX_EXPORT_BYTES))
        self.max_total_bytes = int(max_total_bytes or _env_int("EXPLORER_EXPORT_TOTAL_BYTES", MAX_TOTAL_BYTES))
        for name, v in (("ttl", self.ttl), ("max_export_bytes", self.max_export_bytes),
                        ("max_total_bytes", self.max_total_bytes)):  # fmt: skip
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v!r}")
        self._items: dict[str, Download] = {}
        self._lock = threading.Lock()
        #: whether :attr:`root` is a folder this store made (and deletes on :meth:`close`)
        self._own_root = False

    @property
    def sweep_seconds(self) -> float:
        """How often the server deletes expired exports (a quarter of the expiry, 1 to 60 s)."""
        return min(60.0, max(1.0, self.ttl / 4))

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                base = os.environ.get("EXPLORER_EXPORT_DIR")
                if base:
                    Path(base).mkdir(parents=True, exist_ok=True)
                self._root = Path(tempfile.mkdtemp(prefix="explorer-exports-", dir=base or None))
                self._own_root = True
                atexit.register(self.close)  # a normal exit; bokeh's unload hook covers SIGTERM
            self._root.mkdir(parents=True, exist_ok=True)
            return self._root

    @staticmethod
    def new_key() -> str:
        """A fresh session key (give one to each session)."""
        return secrets.token_urlsafe(24)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(d.size for d in self._items.values())

    def reserve(self, owner: str, name: str, route: str) -> Download:
        """A new, empty private file for ``owner`` called ``name`` (not yet downloadable)."""
        if not owner:
            raise ValueError("an export needs the key of the session that owns it")
        self.expire()
        token = secrets.token_urlsafe(24)
        folder = self.root / token
        folder.mkdir(mode=0o700)
        path = folder / name
        path.touch()
        return Download(token, owner, path, name, route, time.time() + self.ttl)

    def budget(self) -> int:
        """Bytes the next export may take (the per-export cap, less when the store is full)."""
        return max(0, min(self.max_export_bytes, self.max_total_bytes - self.used_bytes()))

    def publish(self, item: Download) -> Download:
        """Make a written file downloadable by its owner until it expires."""
        item.size = item.path.stat().st_size
        if item.size > self.budget():
            self.discard(item)
            raise ExportTooLarge(
                f"{item.name} is {item.size:,} bytes; the exports of this server may use "
                f"{self.budget():,} more bytes now"
            )
        item.expires = time.time() + self.ttl
        with self._lock:
            self._items[item.token] = item
        return item

    def discard(self, item: Download) -> None:
        """Forget an export and delete its file."""
        with self._lock:
            self._items.pop(item.token, None)
        shutil.rmtree(item.path.parent, ignore_errors=True)

    def lookup(self, token: str, name: str, key: str | None) -> Download | None | bool:
        """The export at ``token``/``name`` if ``key`` owns it and it has not expired.

        Returns ``None`` (unknown or expired: 404) or ``False`` (someone else's: 403)."""
        self.expire()
        with self._lock:
            item = self._items.get(token)
        if item is None or item.name != name:
            return None
        if not key or not hmac.compare_digest(str(key), item.owner):
            return False
        return item

    def drop_owner(self, owner: str) -> int:
        """Delete every export of a session (called when the session ends)."""
        with self._lock:
            gone = [d for d in self._items.values() if d.owner == owner]
        for d in gone:
            self.discard(d)
        return len(gone)

    def close(self) -> None:
        """Forget every export and delete the private folder this store made (the process is
        ending: ``app_hooks.on_server_unloaded`` and ``atexit``). Safe to call twice."""
        with self._lock:
            self._items.clear()
            root, own = self._root, self._own_root
            if own:
                self._root, self._own_root = None, False
        if own and root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def expire(self, now: float | None = None) -> int:
        """Delete expired exports; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [d for d in self._items.values() if d.expires <= now]
        for d in gone:
            self.discard(d)
        return len(gone)


_store: DownloadStore | None = None
_store_lock = threading.Lock()


def store() -> DownloadStore:
    """The process-wide :class:`DownloadStore`."""
    global _store
    with _store_lock:
        if _store is None:
            _store = DownloadStore()
        return _store


# --------------------------------------------------------------------------- writing exports
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


def write_export(plan: ExportPlan, progress: bool = False) -> SaveResult:
    """Write the CSV (and zip) of ``plan`` into the download store; thread-safe, touches no
    session. The zip is planned and streamed by :mod:`explorer.curation.exports` (the one path rule
    and the one zip writer) into a private temporary file, within the store's size budget;
    images past the budget are left out and counted. Raises :class:`ExportError` when even
    the CSV does not fit (nothing is left behind)."""
    from explorer.curation import exports
    from explorer.table import write_table

    downloads = store()
    result = SaveResult(rows=len(plan.table))
    made: list[Download] = []
    try:
        csv_item = downloads.reserve(plan.owner, f"{plan.stem}.csv", plan.route)
        made.append(csv_item)
        write_table(plan.table, csv_item.path)
        budget = downloads.budget() - csv_item.path.stat().st_size
        if budget < 0:
            raise ExportTooLarge(f"{csv_item.name} is larger than the export limit of {downloads.budget():,} bytes")
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
            zip_item = downloads.reserve(plan.owner, f"{plan.stem}.zip", plan.route)
            made.append(zip_item)
            with open(zip_item.path, "wb") as raw:
                # the writer's cap counts source bytes; the CappedWriter also bounds zip overhead
                out = CappedWriter(raw, budget, zip_item.name)
                report = exports.write_zip(entries, out, max_bytes=max(0, budget - (1 << 20)),
                                           extra={"MISSING.txt": note} if note else None)
            result.left_out = len(report.left_out)
            result.originals -= sum(1 for a, _ in report.failed)
        for item in made:
            downloads.publish(item)
    except (ExportTooLarge, ValueError) as exc:  # ExportError is a ValueError too
        for item in made:
            downloads.discard(item)
        raise ExportError(str(exc)) from None
    except BaseException:
        for item in made:
            downloads.discard(item)
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


# --------------------------------------------------------------------------- Tornado
def _handler_classes() -> tuple[type, type]:
    """(DownloadHandler, ThumbHandler): two GET handlers that send one file or answer 404."""
    from tornado import web

    class _FileHandler(web.RequestHandler):
        """Sends one file (404 when it cannot be opened or is too big); never sniffed."""

        #: Cache-Control of every answer, errors included ("" = none)
        cache_control = ""

        def set_default_headers(self) -> None:
            self.set_header("X-Content-Type-Options", "nosniff")
            if self.cache_control:
                self.set_header("Cache-Control", self.cache_control)

        async def send(self, path: Any, kind: str, *, max_bytes: int | None = None,
                       headers: dict[str, str] | None = None) -> None:
            try:
                f = open(path, "rb")
            except OSError:
                raise web.HTTPError(404) from None
            with f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise web.HTTPError(404)
                self.set_header("Content-Type", kind)
                self.set_header("Content-Length", str(size))
                for k, v in (headers or {}).items():
                    self.set_header(k, v)
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    self.write(chunk)
                    await self.flush()

    class DownloadHandler(_FileHandler):
        """GET /<route>/_exports/<token>/<name>: the file, for its owner only."""

        cache_control = "no-store"

        def initialize(self, store: DownloadStore) -> None:
            self.store = store

        async def get(self, token: str, name: str) -> None:
            from urllib.parse import unquote

            item = self.store.lookup(token, unquote(name), self.get_cookie(COOKIE))
            if item is None:
                raise web.HTTPError(404)
            if item is False:
                raise web.HTTPError(403)
            kind = "text/csv" if item.name.lower().endswith(".csv") else "application/zip"
            await self.send(item.path, kind, headers={
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(item.name)}"})

    class ThumbHandler(_FileHandler):
        """GET /<route>/_thumb/<row>: that row's thumbnail, if it is an image inside the app."""

        def initialize(self, route: str) -> None:
            self.route = route

        async def get(self, row: str) -> None:
            from explorer.app.project import project_for_route

            project = project_for_route(self.route)
            f = project.thumb_file(int(row)) if project is not None and len(row) < 12 else None
            if f is None:
                raise web.HTTPError(404)
            kind = {".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}.get(f.suffix.lower(), "image/jpeg")
            await self.send(f, kind, max_bytes=8 << 20, headers={"Cache-Control": "private, max-age=3600"})

    return DownloadHandler, ThumbHandler


def url_pattern(app_url: str, prefix: str = "") -> str:
    """The Tornado URL pattern of an app's downloads (``app_url`` like ``/demo``)."""
    base = (prefix.rstrip("/") + "/" + app_url.strip("/")).rstrip("/")
    return base + f"/{URL_SEGMENT}/([A-Za-z0-9_-]{{16,64}})/([^/]+)"


def install(server_context: Any, downloads: DownloadStore | None = None) -> str | None:
    """Add the download handler to the ``bokeh serve`` app of ``server_context``.

    Call from ``app_hooks.on_server_loaded``. Returns the URL pattern added, or ``None`` (with
    a log line) when the Tornado application could not be found (then downloads answer 404).
    """
    ctx = getattr(server_context, "application_context", None)
    if ctx is None:
        return None
    from explorer.app.serving import find_tornado

    app = find_tornado(ctx)
    if app is None:
        log.error("explorer: could not find the Tornado application; exports cannot be downloaded")
        return None
    from explorer.app.project import THUMB_SEGMENT

    prefix = getattr(app, "_prefix", "") or ""
    pattern = url_pattern(ctx.url, prefix)
    base = (prefix.rstrip("/") + "/" + ctx.url.strip("/")).rstrip("/")
    download_handler, thumb_handler = _handler_classes()
    app.add_handlers(r".*", [
        (pattern, download_handler, {"store": downloads or store()}),
        (base + f"/{THUMB_SEGMENT}/([0-9]+)", thumb_handler, {"route": base.strip("/")}),
    ])  # fmt: skip
    log.info("explorer: exports served to their own session at %s", pattern)
    return pattern
