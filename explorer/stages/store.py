"""The vector store: embeddings and decode-derived facts per image content, on disk.

One folder (the build uses ``NAME.store/``) holds

* ``index.sqlite`` - the index (SQLite, WAL):

  - ``models(id, key, dim, alias)``: one row per model key (:func:`explorer.stages.models.model_key`);
    ``alias`` points a requested key at the key actually used (e.g. bf16 fell back to float32);
  - ``vectors(model, hash, row)``: where the vector of one file content (blake2b-128 hex of
    its bytes) for one model lies in that model's array file;
  - ``images(hash, width, height, phash, stats, thumb)``: what a decode yields and no model
    changes - the original size (after EXIF rotation), the 64-bit phash and the quality
    statistics (:func:`explorer.stages.quality.image_stats`) of the thumbnail of side ``thumb``;
  - ``files(path, size, mtime_ns, hash)``: the content hash of a path last time it was seen,
    so an unchanged file (same size and mtime) is not even read again.

* ``vectors-<model id>.f32`` - one append-only float32 array file per model key, ``dim``
  values per row, read with positioned reads of the runs of rows asked for (only those bytes;
  no memory map, so a pass over every row does not leave the whole file counted in the
  process's resident memory) and written with ``os.pwrite`` at reserved rows. Nothing ever
  loads or rewrites the whole file.

Rows are written and indexed inside one SQLite write transaction (the row count is
committed with the index): a crash before the commit leaves bytes past the counted rows,
which the next write overwrites; never a wrong vector. Several processes may share a store.
The store is only touched from the thread that opened it (the build's main thread).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

#: bump when the on-disk layout changes
STORE_VERSION = 1
_CHUNK = 500  # SQLite parameters per IN (...) query


class ImageFacts(NamedTuple):
    """What the store knows of each asked-for hash, as arrays in the order asked
    (:meth:`Store.image_facts`)."""

    found: np.ndarray
    """``(n,)`` bool: the store has a row for this hash (its original size is known)."""
    width: np.ndarray
    """``(n,)`` int64 original width (0 where not found)."""
    height: np.ndarray
    """``(n,)`` int64 original height (0 where not found)."""
    phash: np.ndarray
    """``(n,)`` uint64 64-bit phash (0 where ``has_phash`` is False)."""
    has_phash: np.ndarray
    """``(n,)`` bool: a phash is stored (made from a thumbnail of the asked side)."""
    stats: np.ndarray
    """``(n, n_stats)`` float32 quality statistics (NaN where ``has_stats`` is False)."""
    has_stats: np.ndarray
    """``(n,)`` bool: statistics of the asked length are stored (and thumbnail side)."""

    @property
    def complete(self) -> np.ndarray:
        """``(n,)`` bool: size, phash and statistics are all known (no decode needed)."""
        return self.found & self.has_phash & self.has_stats


class StoreError(ValueError):
    """The store folder cannot be used (not a store, another layout version)."""


def _fskey(path: str | os.PathLike) -> bytes:
    """A path as bytes, lossless for any file name (also non-UTF-8 ones)."""
    return os.fsencode(os.fspath(path))


def _chunks(seq: Sequence, n: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _positions(hashes: Sequence[str | None], n: int = _CHUNK):
    """``(start, {hash: positions})`` per chunk of about ``n`` hashes (``None`` skipped;
    a repeated hash lists every position), so a query never needs a dict over all of them."""
    for a in range(0, len(hashes), n):
        pos: dict[str, list[int]] = {}
        for i, h in enumerate(hashes[a:a + n], a):
            if h is not None:
                pos.setdefault(h, []).append(i)
        if pos:
            yield a, pos


class Store:
    """Open (or create) a store folder. See the module docstring for the layout."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.folder / "index.sqlite"), timeout=60,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS models(id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL,
                dim INTEGER, n_rows INTEGER NOT NULL DEFAULT 0, alias INTEGER);
            CREATE TABLE IF NOT EXISTS vectors(model INTEGER NOT NULL, hash TEXT NOT NULL,
                row INTEGER NOT NULL, PRIMARY KEY(model, hash)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS images(hash TEXT PRIMARY KEY, width INTEGER,
                height INTEGER, phash INTEGER, stats BLOB, thumb INTEGER) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS files(path BLOB PRIMARY KEY, size INTEGER,
                mtime_ns INTEGER, hash TEXT) WITHOUT ROWID;
        """)
        row = self.db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES('version', ?)", (str(STORE_VERSION),))
        elif row[0] != str(STORE_VERSION):
            raise StoreError(f"store {self.folder} has layout version {row[0]}, "
                             f"this explorer reads {STORE_VERSION}; delete the folder to rebuild it")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ models
    def model_id(self, key: str, *, create: bool = True) -> int | None:
        """The id of a model key (following an alias); created when missing and ``create``."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"model key must be a non-empty string, got {key!r}")
        row = self.db.execute("SELECT id, alias FROM models WHERE key=?", (key,)).fetchone()
        if row is None:
            if not create:
                return None
            self.db.execute("INSERT OR IGNORE INTO models(key) VALUES(?)", (key,))
            row = self.db.execute("SELECT id, alias FROM models WHERE key=?", (key,)).fetchone()
        return int(row[1]) if row[1] is not None else int(row[0])

    def alias(self, requested: str, actual: str) -> int:
        """Record that vectors asked for under ``requested`` are made under ``actual``."""
        aid = self.model_id(actual)
        if requested != actual:
            self.model_id(requested)
            self.db.execute("UPDATE models SET alias=? WHERE key=?", (aid, requested))
        return aid

    def dim(self, model: int) -> int | None:
        row = self.db.execute("SELECT dim FROM models WHERE id=?", (model,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def count(self, model: int) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM vectors WHERE model=?",
                                   (model,)).fetchone()[0])

    def _path(self, model: int) -> Path:
        return self.folder / f"vectors-{model}.f32"

    # ------------------------------------------------------------------ vectors
    def rows(self, model: int, hashes: Sequence[str]) -> np.ndarray:
        """Row of each hash in the model's array file, -1 where the store has none.
        Queried a chunk of hashes at a time: memory beyond the answer stays constant."""
        out = np.full(len(hashes), -1, np.int64)
        for a, pos in _positions(hashes):
            q = f"SELECT hash, row FROM vectors WHERE model=? AND hash IN ({','.join('?' * len(pos))})"
            for h, r in self.db.execute(q, (model, *pos)):
                out[pos[h]] = r
        return out

    def read(self, model: int, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Vectors at ``rows`` (all >= 0) into ``out`` (float32, (len(rows), dim)); only
        those rows are read from disk, in file order, a run of adjacent rows (at most
        ``_CHUNK``) per read."""
        rows = np.asarray(rows, dtype=np.int64)
        dim = self.dim(model)
        if out is None:
            out = np.empty((len(rows), dim or 0), np.float32)
        if len(rows) == 0:
            return out
        path = self._path(model)
        n = path.stat().st_size // (4 * dim) if dim and path.is_file() else 0
        if rows.min() < 0 or rows.max() >= n:
            raise StoreError(f"store {self.folder}: rows outside the array file of model {model}")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        # runs of adjacent (or repeated) rows, cut to at most _CHUNK positions each
        cut = np.flatnonzero(np.diff(srt) > 1) + 1
        starts = np.unique(np.concatenate([[0], cut, np.arange(0, len(srt), _CHUNK)]))
        ends = np.append(starts[1:], len(srt))
        with open(path, "rb", buffering=0) as fh:
            for a, b in zip(starts.tolist(), ends.tolist()):
                first, count = int(srt[a]), int(srt[b - 1] - srt[a]) + 1
                buf = np.empty((count, dim), np.float32)
                fh.seek(first * 4 * dim)
                got = fh.readinto(memoryview(buf).cast("B"))
                if got != buf.nbytes:
                    raise StoreError(f"store {self.folder}: the array file of model {model} "
                                     "ended early")
                out[order[a:b]] = buf[srt[a:b] - first]
        return out

    def put(self, model: int, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Append vectors (n, D) for content hashes (already stored ones are left as they are)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(hashes):
            raise ValueError(f"put: {len(hashes)} hashes but vectors of shape {vectors.shape}")
        if len(hashes) == 0:
            return
        have = self.rows(model, hashes)
        seen: set[str] = set()
        keep = []
        for i, h in enumerate(hashes):
            if have[i] < 0 and h not in seen:
                seen.add(h)
                keep.append(i)
        if not keep:
            return
        d = vectors.shape[1]
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            # the write lock is held from here to COMMIT: no other writer reserves these rows
            self.db.execute("UPDATE models SET n_rows=n_rows WHERE id=?", (model,))
            dim, n_rows = self.db.execute("SELECT dim, n_rows FROM models WHERE id=?",
                                          (model,)).fetchone()
            if dim is not None and dim != d:
                raise ValueError(f"put: vectors have dimension {d}, the store's model has {dim}")
            block = vectors[keep] if len(keep) != len(vectors) else vectors
            fd = os.open(self._path(model), os.O_WRONLY | os.O_CREAT, 0o666)
            try:
                view, off = memoryview(block.tobytes()), n_rows * d * 4
                while view:
                    k = os.pwrite(fd, view, off)
                    view, off = view[k:], off + k
            finally:
                os.close(fd)
            self.db.executemany("INSERT OR IGNORE INTO vectors VALUES(?,?,?)",
                                [(model, hashes[i], n_rows + j) for j, i in enumerate(keep)])
            self.db.execute("UPDATE models SET dim=?, n_rows=? WHERE id=?",
                            (d, n_rows + len(keep), model))
            if own:
                self.db.execute("COMMIT")
        except BaseException:
            if own:
                self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ images
    def put_images(self, hashes: Sequence[str], width, height, phash, stats,
                   thumb: int) -> None:
        """Remember per content hash: original size, 64-bit phash (uint64 or None), stats."""
        rows = []
        for h, w, ht, p, s in zip(hashes, width, height, phash, stats):
            ps = None if p is None else int(np.uint64(p).astype(np.int64))
            sb = None if s is None else np.asarray(s, np.float32).tobytes()
            rows.append((h, int(w), int(ht), ps, sb, int(thumb)))
        self.db.executemany("INSERT OR REPLACE INTO images VALUES(?,?,?,?,?,?)", rows)

    def image_facts(self, hashes: Sequence[str | None], n_stats: int,
                    thumb: int | None = None) -> ImageFacts:
        """Original size, phash and quality statistics of each hash (``None``: unknown),
        as arrays in the order asked (:class:`ImageFacts`); phash and statistics count
        only when made from a thumbnail of side ``thumb`` (when given). Queried a chunk
        of hashes at a time: nothing is built over the whole store or the whole list
        beyond the answer's arrays."""
        n = len(hashes)
        f = ImageFacts(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64),
                       np.zeros(n, np.uint64), np.zeros(n, bool),
                       np.full((n, n_stats), np.nan, np.float32), np.zeros(n, bool))
        for _, pos in _positions(hashes):
            q = f"SELECT hash, width, height, phash, stats, thumb FROM images WHERE hash IN ({','.join('?' * len(pos))})"
            for h, w, ht, p, s, t in self.db.execute(q, tuple(pos)):
                i = pos[h]
                fresh = thumb is None or t == thumb
                f.found[i], f.width[i], f.height[i] = True, w, ht
                if p is not None and fresh:
                    f.phash[i], f.has_phash[i] = np.int64(p).astype(np.uint64), True
                if s is not None and fresh and len(s) == 4 * n_stats:
                    f.stats[i], f.has_stats[i] = np.frombuffer(s, np.float32), True
        return f

    # ------------------------------------------------------------------ files
    def known_hashes(self, paths: Sequence[str | os.PathLike], sizes, mtimes) -> list[str | None]:
        """The content hash of each path when it is unchanged since it was last recorded
        (same size and mtime in nanoseconds), else None."""
        keys = [_fskey(p) for p in paths]
        pos = {k: i for i, k in enumerate(keys)}
        out: list[str | None] = [None] * len(keys)
        for part in _chunks(keys):
            q = f"SELECT path, size, mtime_ns, hash FROM files WHERE path IN ({','.join('?' * len(part))})"
            for k, sz, mt, h in self.db.execute(q, part):
                i = pos[bytes(k)]
                if sz == sizes[i] and mt == mtimes[i]:
                    out[i] = h
        return out

    def put_files(self, paths, sizes, mtimes, hashes) -> None:
        self.db.executemany("INSERT OR REPLACE INTO files VALUES(?,?,?,?)",
                            [(_fskey(p), int(s), int(m), h)
                             for p, s, m, h in zip(paths, sizes, mtimes, hashes)])

    def transaction(self):
        """``with store.transaction():`` groups many puts into one commit (faster)."""
        return _Tx(self.db)


class _Tx:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN")
        return self

    def __exit__(self, et, ev, tb):
        self.db.execute("ROLLBACK" if et is not None else "COMMIT")
