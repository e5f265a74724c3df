"""The decoder the embedding engines share: read, hash, decode, thumbnail, describe and
preprocess one file (:class:`Decoder`), and the :class:`Item` that carries one file's results
through a worker (a thread, a DataLoader process or a Ray task).

It sits below :mod:`explorer.stages.embed` and :mod:`explorer.stages.ray_engine` (both import it; it imports
neither)."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from explorer.stages.images import ImageLoadError, decode_image, read_file, thumbnail
from explorer.stages.models import Preprocessor


@dataclass
class Item:
    """One file's trip through a worker (picklable: crosses processes and Ray tasks)."""

    index: int
    hash: str | None = None
    size: tuple[int, int] | None = None
    phash: int | None = None
    stats: np.ndarray | None = None
    pixels: np.ndarray | None = None  # preprocessed uint8 (H, W, 3), when a vector is needed
    has_vector: bool = False  # the store holds its vector (no forward pass)
    jpeg: bytes | None = None  # raw JPEG left for the device to decode (gpu_decode)
    decoded: bool = False
    error: str | None = None


# --------------------------------------------------------------------------- the decoder
class Decoder:
    """Read, hash, decode, thumbnail, describe and preprocess one file (a picklable callable).

    ``task = (index, path, known_hash)``. With ``store_path`` it asks the store (its own
    read-only SQLite connection per thread and process) whether the content already has a
    vector and the decode facts, and then skips the decode (unless a thumbnail is wanted).
    ``sink`` (optional) has ``need(i, hash) -> bool`` and ``__call__(i, hash, thumb)``.
    """

    def __init__(self, prep: Preprocessor | None, *, thumb_size: int, max_bytes: int | None,
                 sink=None, store_path: str | None = None, model_id: int | None = None,
                 n_stats: int = 0, raw_jpeg: bool = False):
        self.prep = prep
        # hand JPEGs that need a vector over undecoded (the device decodes them)
        self.raw_jpeg = raw_jpeg and prep is not None and prep.fast
        self.thumb_size = thumb_size
        self.max_bytes = max_bytes
        self.sink = sink
        self.store_path = store_path
        self.model_id = model_id
        self.n_stats = n_stats
        self._local = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_local"] = None
        return d

    def _db(self):
        if self.store_path is None:
            return None
        if self._local is None:
            self._local = threading.local()
        key = os.getpid()
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != key:
            db = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=60,
                                 check_same_thread=False)
            self._local.db, self._local.pid = db, key
        return db

    def _known(self, h: str) -> tuple[bool, bool]:
        """(the store has its vector, the store has its decode facts for this thumb size)."""
        try:
            db = self._db()
        except sqlite3.Error:  # e.g. a Ray worker on another machine: no store here
            self.store_path = None
            db = None
        if db is None:
            return False, False
        try:
            v = self.model_id is not None and db.execute(
                "SELECT 1 FROM vectors WHERE model=? AND hash=?", (self.model_id, h)).fetchone()
            r = db.execute("SELECT thumb, phash, stats FROM images WHERE hash=?", (h,)).fetchone()
        except sqlite3.Error:
            return False, False
        info = (r is not None and r[0] == self.thumb_size and r[1] is not None
                and r[2] is not None and len(r[2]) == 4 * self.n_stats)
        return bool(v), info

    def __call__(self, task) -> Item:
        i, path, known = task
        item = Item(i, hash=known)
        try:
            data, item.hash = read_file(path, self.max_bytes)
            has_vec, has_info = self._known(item.hash)
            item.has_vector = has_vec
            want_thumb = self.sink is not None and self.sink.need(i, item.hash)
            if has_vec and has_info and not want_thumb:
                return item
            if self.raw_jpeg and not has_vec and data[:3] == b"\xff\xd8\xff":
                item.jpeg = data  # decoded on the device (decode_jpeg_batch)
                return item
        except ImageLoadError as exc:
            item.error = exc.reason
            return item
        except (OSError, ValueError) as exc:
            item.error = f"cannot decode ({type(exc).__name__}: {exc})"
            return item
        return self.decode(item, data, path, need_px=not has_vec and self.prep is not None)

    def decode(self, item: Item, data: bytes, name, *, need_px: bool) -> Item:
        """Decode ``data`` on the CPU: size, thumbnail (to the sink), phash, statistics and,
        with ``need_px``, the model's input pixels."""
        thumb = None
        try:
            draft = self.prep.scale_size if need_px else self.thumb_size
            img, item.size = decode_image(data, draft, name=name)
            del data
            thumb = thumbnail(img, self.thumb_size)
            self.describe(item, thumb)
            if need_px:
                item.pixels = self.prep(img)
        except ImageLoadError as exc:
            item.error = exc.reason
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            item.error = f"cannot decode ({type(exc).__name__}: {exc})"
        if item.error is None and item.decoded:
            self.to_sink(item, thumb)
        return item

    def describe(self, item: Item, thumb: Image.Image) -> None:
        """phash and quality statistics of the thumbnail."""
        from explorer.stages.quality import image_stats
        from explorer.stages.similarity import phash_of

        item.phash = int(phash_of(thumb))
        item.stats = image_stats(thumb)
        item.decoded = True

    def to_sink(self, item: Item, thumb: Image.Image) -> None:
        """The thumbnail to the sink when it wants it; may raise (disk full ...): that
        stops the run."""
        if self.sink is not None and self.sink.need(item.index, item.hash):
            self.sink(item.index, item.hash, thumb)
