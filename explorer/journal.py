"""An append-only, crash-safe journal of edits: ``NAME.labels.jsonl`` beside ``NAME.csv``.

One JSON object per line::

    {"seq": 7, "ts": "2025-01-01T12:00:00.123456+00:00", "session": "3f2a9c1e0b7d",
     "op": "apply", "args": {...}}

Guarantees
----------
* :meth:`Journal.append` returns only after the line is written with one ``write`` call,
  flushed and ``os.fsync``-ed; a caller may tell the browser "saved" after it returns.
  A process killed with SIGKILL afterwards loses nothing that was acknowledged.
* Writers take an exclusive ``fcntl.flock`` on the file (and a thread lock), so two
  processes or threads never interleave lines and ``seq`` numbers are unique and increasing.
  Records are only ever appended, never rewritten.
* Readers (:meth:`replay`, :meth:`read_since`) take a shared lock and skip lines that are
  not valid JSON records with a :class:`JournalWarning` (a torn last line after a crash in
  the middle of a write); earlier lines are never lost. The next append starts on a fresh
  line, so a torn line never corrupts a later record.
* :meth:`locked` holds the exclusive lock over a read-then-append sequence, so a caller can
  catch up with other writers and append in one atomic step (``LabelBook`` does this).

The journal knows nothing about labels: ``op`` and ``args`` are the caller's.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from explorer.table import sidecar

__all__ = ["Journal", "JournalWarning", "journal_for"]

_RESERVED = ("seq", "ts", "session")


class JournalWarning(UserWarning):
    """A journal line could not be read (torn by a crash, or edited by hand) and was skipped."""


def journal_for(csv_path: str | os.PathLike, session: str | None = None) -> "Journal":
    """The journal that belongs to ``NAME.csv``: ``NAME.labels.jsonl`` in the same folder."""
    return Journal(sidecar(csv_path, "labels.jsonl"), session=session)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


class Journal:
    """Append-only JSONL journal with fsync'd appends, file locking and incremental reads.

    Parameters
    ----------
    path:
        The journal file. Created (with its folder) on the first append; reading a journal
        that does not exist yet gives no records.
    session:
        Id written into every record this object appends (one per browser session).
        Default: a new random id (``self.session``).
    """

    def __init__(self, path: str | os.PathLike, session: str | None = None):
        self.path = Path(path)
        if session is None:
            session = uuid.uuid4().hex[:12]
        if not isinstance(session, str) or not session or any(ord(c) < 32 for c in session):
            raise ValueError(f"session must be a non-empty printable string, got {session!r}")
        self.session = session
        self._tlock = threading.RLock()
        self._lock_fd: int | None = None  # fd holding the exclusive flock while locked()
        self._depth = 0
        # incremental read cache: records parsed from bytes [0, _offset)
        self._records: list[dict] = []
        self._offset = 0
        self._ino: int | None = None
        self._warned: set[int] = set()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, session={self.session!r})"

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def locked(self) -> Iterator["Journal"]:
        """Hold the exclusive lock (re-entrant in this thread) around reads and appends.

        Inside the block no other process or thread can append, so what
        :meth:`read_since` returns is complete until the block ends.
        """
        with self._tlock:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                created = not self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                if created:
                    _fsync_dir(self.path.parent)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._lock_fd = self._lock_fd, None
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)

    # ------------------------------------------------------------------ writing
    def append(self, record: Mapping[str, Any]) -> int:
        """Append one record; return its ``seq`` once it is on disk (flushed and fsync'd).

        ``record`` must hold ``op`` (a non-empty string) and may hold ``args`` (any
        JSON-serialisable value) and other JSON-serialisable fields. ``seq``, ``ts`` and
        ``session`` are filled in by the journal and must not be given.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"record must be a mapping, got {type(record).__name__}")
        op = record.get("op")
        if not isinstance(op, str) or not op:
            raise ValueError(f"record needs a non-empty string 'op', got {op!r}")
        clash = [k for k in _RESERVED if k in record]
        if clash:
            raise ValueError(f"record must not set {clash}: the journal fills them in")
        with self.locked():
            self._catch_up()
            seq = (self._records[-1]["seq"] if self._records else 0) + 1
            full = {"seq": seq, "ts": _now(), "session": self.session}
            full.update(record)
            try:
                line = json.dumps(full, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"record is not JSON-serialisable: {exc}") from exc
            data = line.encode("utf-8") + b"\n"
            fd = self._lock_fd
            size = os.fstat(fd).st_size
            if size and not self._ends_with_newline(fd, size):
                # a torn line from a crash: end it so the new record starts on its own line
                data = b"\n" + data
            _write_all(fd, data)
            os.fsync(fd)
            # our own record is now the newest; parse it on the next read like any other
            self._catch_up()
            return seq

    @staticmethod
    def _ends_with_newline(fd: int, size: int) -> bool:
        return os.pread(fd, 1, size - 1) == b"\n"

    # ------------------------------------------------------------------ reading
    def replay(self) -> list[dict]:
        """Every readable record in file order (a torn or invalid line is skipped with a warning)."""
        with self._read_lock():
            self._catch_up()
            return list(self._records)

    def read_since(self, seq: int) -> list[dict]:
        """Records with ``seq`` greater than ``seq`` (for polling changes made by other tabs)."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
        with self._read_lock():
            self._catch_up()
            recs = self._records
            # records are in increasing seq order: find the first one after seq
            lo, hi = 0, len(recs)
            while lo < hi:
                mid = (lo + hi) // 2
                if recs[mid]["seq"] <= seq:
                    lo = mid + 1
                else:
                    hi = mid
            return list(recs[lo:])

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` in the journal (0 when empty or missing)."""
        with self._read_lock():
            self._catch_up()
            return self._records[-1]["seq"] if self._records else 0

    @contextlib.contextmanager
    def _read_lock(self) -> Iterator[None]:
        with self._tlock:
            if self._depth:  # already hold the exclusive lock
                yield
                return
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def _catch_up(self) -> None:
        """Parse the bytes appended since the last read (caller holds a lock)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._records, self._offset, self._ino = [], 0, None
            return
        if self._ino != st.st_ino or st.st_size < self._offset:
            # a different or truncated file: start again
            self._records, self._offset, self._ino = [], 0, st.st_ino
            self._warned.clear()
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        end = data.rfind(b"\n")
        complete = data[: end + 1] if end >= 0 else b""
        lineno_offset = self._offset
        pos = 0
        for raw in complete.split(b"\n")[:-1]:
            self._parse_line(raw, lineno_offset + pos)
            pos += len(raw) + 1
        self._offset += len(complete)
        tail = data[end + 1 :]
        if tail.strip() and self._offset not in self._warned:
            # no writer is active (we hold a lock), so an unterminated tail is a torn write
            self._warned.add(self._offset)
            warnings.warn(
                f"{self.path}: ignoring an incomplete last line at byte {self._offset} "
                f"({len(tail)} bytes; a write was cut off, e.g. by a crash)",
                JournalWarning,
                stacklevel=4,
            )

    def _parse_line(self, raw: bytes, at: int) -> None:
        if not raw.strip():
            return
        try:
            rec = json.loads(raw.decode("utf-8"))
            ok = (
                isinstance(rec, dict)
                and isinstance(rec.get("seq"), int)
                and isinstance(rec.get("op"), str)
            )
        except (UnicodeDecodeError, ValueError):
            ok = False
        if ok and self._records and rec["seq"] <= self._records[-1]["seq"]:
            ok = False  # out of order: never trust it over what came before
        if not ok:
            warnings.warn(
                f"{self.path}: skipping an unreadable line at byte {at} ({raw[:60]!r})",
                JournalWarning,
                stacklevel=5,
            )
            return
        self._records.append(rec)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
