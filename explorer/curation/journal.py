"""The label journal beside the CSV: ``NAME.labels.sqlite`` (stdlib ``sqlite3``, WAL mode).

Tables
------
``events(seq INTEGER PRIMARY KEY, session, time, op, target, payload)``
    One row per record, in ``seq`` order. ``payload`` is the JSON of the record's own
    fields (``args`` and anything else the caller gave): text, or for a big record (over
    :data:`COMPRESS_OVER` bytes, e.g. 100k keys) a zlib-compressed BLOB of that text, which
    :meth:`Journal.read_since` decompresses. ``target`` is ``args["target"]``
    when that is an integer (undo/redo), so a session's undo stack can be rebuilt from
    three small columns without parsing payloads.
``labels(key PRIMARY KEY, label)``
    The current label of every key the journal has touched (``""`` = cleared), updated in
    the same transaction as the event, so a reader loads the state without replaying.
``meta(name PRIMARY KEY, value)``
    Book-keeping, e.g. that an old ``NAME.labels.jsonl`` was imported.

Records
-------
A record is a mapping with ``op`` (a non-empty string) and optionally ``args`` and other
JSON-serialisable fields; ``seq``, ``ts`` and ``session`` are filled in. When
``args["changes"]`` is present it must be a list of groups ``[old, new, [key, ...]]``
(each key once in the whole record): the ``labels`` table takes ``new`` for those keys.

Guarantees
----------
* :meth:`Journal.append` returns only after its transaction is committed with
  ``synchronous=FULL`` (the WAL is fsync'd): a caller may say "saved" after it returns, and
  a process killed with SIGKILL (or a power cut) afterwards loses nothing acknowledged.
  Inside :meth:`Journal.locked` the append joins the block's transaction, which is
  committed when the block exits (the caller acknowledges after that).
* A failed write (read-only folder, disk full, a folder where the file should be) raises
  :class:`JournalError`, an ``OSError``; nothing of that record is kept.
* SQLite does the locking (``BEGIN IMMEDIATE``): writers in several threads and processes
  never interleave and ``seq`` numbers are unique and increasing. Readers never block
  writers (WAL) and read only what is new (``WHERE seq > ?``).
* An old ``NAME.labels.jsonl`` beside the database is imported once, automatically, when
  the journal is first opened; the ``.jsonl`` file is left untouched. A torn last line, even
  a complete JSON object without its final newline, was never acknowledged and is skipped
  with a :class:`JournalWarning`; when an old writer later wrote a record with the same
  ``seq`` (review H4), the later, acknowledged, record is the one imported.

One connection per database file and process is shared by every :class:`Journal` object
on it (they differ only in their session id), guarded by a lock. A file deleted or replaced
while open is opened again. To start the labels afresh, delete ``NAME.labels.sqlite`` (with
its ``-wal`` and ``-shm``) and any old ``NAME.labels.jsonl`` (it would be imported again).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
import threading
import time
import uuid
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from explorer._checks import check_int
from explorer.table import sidecar

__all__ = ["Journal", "JournalError", "JournalWarning", "journal_for", "change_groups"]

_RESERVED = ("seq", "ts", "session")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY, session TEXT NOT NULL, time TEXT NOT NULL,
    op TEXT NOT NULL, target INTEGER, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_session ON events(session, seq);
CREATE TABLE IF NOT EXISTS labels(key TEXT PRIMARY KEY, label TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_UPSERT = ("INSERT INTO labels(key, label) VALUES(?, ?) "
           "ON CONFLICT(key) DO UPDATE SET label = excluded.label")
# the same from one JSON array, parsed by SQLite (about twice as fast for big edits), in key
# order (B-tree friendly); "WHERE true" keeps ON CONFLICT from parsing as a join constraint
_UPSERT_JSON = ("INSERT INTO labels(key, label) SELECT value, ? FROM json_each(?) WHERE true "
                "ORDER BY 1 ON CONFLICT(key) DO UPDATE SET label = excluded.label")
_json_each = [True]  # SQLite built without JSON1: fall back to executemany
#: payloads longer than this (bytes of JSON) are stored zlib-compressed
COMPRESS_OVER = 16_384


class JournalWarning(UserWarning):
    """A record of an old ``.jsonl`` journal could not be read (torn by a crash) and was skipped."""


class JournalError(OSError):
    """The journal could not be read or written (read-only folder, disk full, not a database)."""


def journal_for(csv_path: str | os.PathLike, session: str | None = None) -> "Journal":
    """The journal that belongs to ``NAME.csv``: ``NAME.labels.sqlite`` in the same folder
    (an old ``NAME.labels.jsonl`` there is imported on first open)."""
    return Journal(sidecar(csv_path, "labels.sqlite"), session=session)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def change_groups(changes) -> list[list]:
    """``args["changes"]`` as a list of ``[old, new, [keys]]`` groups.

    Accepts the current format (already groups) and the old ``.jsonl`` one
    (``{key: [old, new]}``); raises ``ValueError`` for anything else.
    """
    if changes is None:
        return []
    if isinstance(changes, Mapping):  # the old format: one entry per key
        groups: dict[tuple[str, str], list[str]] = {}
        for k, pair in changes.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"changes[{k!r}] must be [old, new], got {pair!r}")
            groups.setdefault((str(pair[0]), str(pair[1])), []).append(str(k))
        return [[o, n, ks] for (o, n), ks in groups.items()]
    if not isinstance(changes, (list, tuple)):
        raise ValueError(f"changes must be a list of [old, new, [keys]] groups, got {changes!r:.80}")
    for g in changes:
        if (not isinstance(g, (list, tuple)) or len(g) != 3 or not isinstance(g[0], str)
                or not isinstance(g[1], str) or not isinstance(g[2], (list, tuple))
                or not set(map(type, g[2])) <= {str}):
            raise ValueError(f"a change group must be [old, new, [keys]], got {g!r:.80}")
    return [list(g) for g in changes]


def _sql_error(path: Path, what: str, exc: BaseException) -> JournalError:
    return JournalError(f"cannot {what} the label journal {path}: {exc}")


# ---------------------------------------------------------------------- one database per process
class _Database:
    """The connection to one database file in this process, shared by its Journal objects."""

    _registry: "weakref.WeakValueDictionary[tuple, _Database]" = weakref.WeakValueDictionary()
    _registry_lock = threading.Lock()

    @classmethod
    def get(cls, path: Path, legacy: Path | None) -> "_Database":
        key = (str(path.absolute()), os.getpid())  # never share a connection across fork
        with cls._registry_lock:
            db = cls._registry.get(key)
            if db is None:
                db = cls(path, legacy)
                cls._registry[key] = db
            return db

    def __init__(self, path: Path, legacy: Path | None):
        self.path = path
        self.legacy = legacy
        self.lock = threading.RLock()
        self.conn: sqlite3.Connection | None = None
        self.inode: int | None = None
        self.depth = 0  # nesting of locked() blocks (the write transaction)
        self._finalizer = None

    def connect(self, create: bool) -> sqlite3.Connection | None:
        """The open connection; ``None`` when there is no journal yet and ``create`` is false.

        A file that was deleted or replaced since it was opened is opened again (outside a
        transaction), so nothing is ever written into a file no one else sees.
        """
        if self.conn is not None:
            if self.depth:
                return self.conn
            try:
                same = os.stat(self.path).st_ino == self.inode
            except OSError:
                same = False
            if same:
                return self.conn
            self._finalizer()
            self.conn = None
        legacy = self.legacy is not None and self.legacy.is_file()
        if not (create or legacy or os.path.lexists(self.path)):
            return None
        fresh = not os.path.lexists(self.path)
        try:
            if fresh:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise _sql_error(self.path, "open", exc) from exc
        try:
            _retry_busy(conn, lambda: _setup(conn))
            if fresh:
                _fsync_dir(self.path.parent)
            if legacy:
                _retry_busy(conn, lambda: _import_legacy(conn, self.legacy))
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise _sql_error(self.path, "open", exc) from exc
        self.conn = conn
        self.inode = os.stat(self.path).st_ino
        self._finalizer = weakref.finalize(self, conn.close)
        return conn


def _setup(conn: sqlite3.Connection) -> None:
    """Per-connection settings; WAL mode and the tables on a new file."""
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-8192")  # at most 8 MiB of page cache
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"events", "labels", "meta"} <= have:
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.OperationalError("database is locked (cannot switch to WAL)")
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")


def _retry_busy(conn: sqlite3.Connection, fn: Callable[[], None], patience: float = 60.0) -> None:
    """Run ``fn``, retrying "database is locked" for up to ``patience`` seconds.

    Several processes opening a new file at once can get that error without SQLite's busy
    handler being asked (switching to WAL, reading the schema while another connection
    switches, recovering a WAL after a crash).
    """
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


# ---------------------------------------------------------------------- legacy .jsonl
def _import_legacy(conn: sqlite3.Connection, legacy: Path) -> None:
    """Carry an old ``.jsonl`` journal over, once (``meta.imported_jsonl`` remembers it)."""
    if conn.execute("SELECT 1 FROM meta WHERE name='imported_jsonl'").fetchone():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM meta WHERE name='imported_jsonl'").fetchone():
            conn.execute("COMMIT")
            return  # another process imported it first
        if conn.execute("SELECT 1 FROM events LIMIT 1").fetchone():
            note = {"skipped": "the database already had records"}
        else:
            records = _read_legacy(legacy)
            for rec in records:
                _insert(conn, rec)
            note = {"records": len(records)}
        st = legacy.stat()
        note.update(file=legacy.name, size=st.st_size, mtime=st.st_mtime, at=_now())
        conn.execute("INSERT INTO meta(name, value) VALUES('imported_jsonl', ?)",
                     (json.dumps(note),))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _read_legacy(path: Path) -> list[dict]:
    """The acknowledged records of an old ``.jsonl`` journal, changes in the current format."""
    data = path.read_bytes()
    end = data.rfind(b"\n")
    tail = data[end + 1:]
    if tail.strip():
        # a line without its newline was cut off before the write finished: it was never
        # acknowledged (review H4), even when it happens to be complete JSON
        warnings.warn(
            f"{path}: skipping an incomplete last line at byte {end + 1} "
            f"({len(tail)} bytes; a write was cut off, e.g. by a crash); it was never saved",
            JournalWarning, stacklevel=5,
        )
    out: list[dict] = []
    pos = 0
    for raw in data[: end + 1].split(b"\n")[:-1]:
        at, pos = pos, pos + len(raw) + 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            ok = (isinstance(rec, dict) and isinstance(rec.get("seq"), int)
                  and not isinstance(rec.get("seq"), bool) and rec["seq"] > 0
                  and isinstance(rec.get("op"), str) and rec["op"])
            if ok and isinstance(rec.get("args"), dict) and "changes" in rec["args"]:
                args = dict(rec["args"])
                args["changes"] = change_groups(args["changes"])
                if "changes" in rec["args"]:
                    args.pop("keys", None)  # the changes carry the keys (review M6)
                rec["args"] = args
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            warnings.warn(f"{path}: skipping an unreadable line at byte {at} ({raw[:60]!r})",
                          JournalWarning, stacklevel=5)
            continue
        if out and rec["seq"] <= out[-1]["seq"]:
            # An old writer gives the next record the seq after the last *complete* line, so
            # an earlier line with this seq (or a later one) was a torn tail it did not see:
            # never acknowledged. The later record was acknowledged; keep it (review H4).
            while out and out[-1]["seq"] >= rec["seq"]:
                dropped = out.pop()
                warnings.warn(f"{path}: record seq {dropped['seq']} was an unacknowledged torn "
                              "write, superseded by a later record with that seq; skipped",
                              JournalWarning, stacklevel=5)
        out.append(rec)
    return out


def _insert(conn: sqlite3.Connection, rec: Mapping[str, Any]) -> int:
    """Insert one full record (``seq`` may be None: the next one) and update ``labels``."""
    payload = {k: v for k, v in rec.items() if k not in ("seq", "ts", "session", "op")}
    args = payload.get("args")
    target = args.get("target") if isinstance(args, Mapping) else None
    if isinstance(target, bool) or not isinstance(target, int):
        target = None
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if len(text) > COMPRESS_OVER:
        text = zlib.compress(text.encode("utf-8"), 1)
    cur = conn.execute(
        "INSERT INTO events(seq, session, time, op, target, payload) VALUES(?, ?, ?, ?, ?, ?)",
        (rec.get("seq"), str(rec.get("session", "")), str(rec.get("ts", "")), rec["op"], target,
         text),
    )
    if isinstance(args, Mapping) and args.get("changes"):
        for _, new, keys in args["changes"]:
            _upsert(conn, keys, new)
    return cur.lastrowid


def _upsert(conn: sqlite3.Connection, keys: list[str], label: str) -> None:
    if len(keys) > 50 and _json_each[0]:
        try:
            conn.execute(_UPSERT_JSON, (label, json.dumps(keys, ensure_ascii=False)))
            return
        except sqlite3.OperationalError as exc:
            if "json_each" not in str(exc):
                raise
            _json_each[0] = False
    conn.executemany(_UPSERT, ((k, label) for k in sorted(keys)))


def _row_record(row) -> dict:
    seq, session, time, op, payload = row
    rec = {"seq": seq, "ts": time, "session": session, "op": op}
    try:
        if isinstance(payload, bytes):
            payload = zlib.decompress(payload)
        rec.update(json.loads(payload))
    except (ValueError, zlib.error):
        pass
    return rec


# ---------------------------------------------------------------------- the journal
class Journal:
    """The label journal in SQLite: committed appends, incremental reads, a state table.

    Parameters
    ----------
    path:
        The database file (``NAME.labels.sqlite``); created, with its folder, on the first
        append. Reading a journal that does not exist yet gives no records. An old
        ``NAME.labels.jsonl`` beside it is imported on first open. Given a ``.jsonl`` path
        (the old journal), the database beside it (same name, ``.sqlite``) is used.
    session:
        Id written into every record this object appends (one per browser session).
        Default: a new random id (``self.session``).
    """

    def __init__(self, path: str | os.PathLike, session: str | None = None):
        path = Path(path)
        if path.suffix == ".jsonl":
            legacy, path = path, path.with_suffix(".sqlite")
        elif path.suffix == ".sqlite":
            legacy = path.with_suffix(".jsonl")
        else:
            legacy = None
        self.path = path
        self.legacy_path = legacy
        if session is None:
            session = uuid.uuid4().hex[:12]
        if not isinstance(session, str) or not session or any(ord(c) < 32 for c in session):
            raise ValueError(f"session must be a non-empty printable string, got {session!r}")
        self.session = session
        self._db_pid = -1

    @property
    def _db(self) -> _Database:
        """This process's connection to the file (a child process after fork gets its own)."""
        if self._db_pid != os.getpid():
            self._dbref = _Database.get(self.path, self.legacy_path)
            self._db_pid = os.getpid()
        return self._dbref

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, session={self.session!r})"

    def exists(self) -> bool:
        """Whether there is anything to read (the database, or an old ``.jsonl`` to import)."""
        return os.path.lexists(self.path) or (
            self.legacy_path is not None and self.legacy_path.is_file())

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def locked(self) -> Iterator["Journal"]:
        """One write transaction (``BEGIN IMMEDIATE``), re-entrant in this thread.

        Inside the block no other process or thread can append, so what :meth:`read_since`
        returns is complete until the block ends; appends made inside are committed (and
        durable) when the outermost block exits, or all rolled back if it raises.
        """
        db = self._db
        with db.lock:
            if db.depth == 0:
                conn = db.connect(create=True)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise _sql_error(self.path, "write", exc) from exc
            db.depth += 1
            ok = False
            try:
                yield self
                ok = True
            finally:
                db.depth -= 1
                if db.depth == 0:
                    self._finish(db.conn, ok)

    def _finish(self, conn: sqlite3.Connection, ok: bool) -> None:
        if ok:
            try:
                conn.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _sql_error(self.path, "write", exc) from exc
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")

    # ------------------------------------------------------------------ writing
    def append(self, record: Mapping[str, Any]) -> int:
        """Append one record; return its ``seq`` once it is committed (see :meth:`locked`).

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
        full = {"seq": None, "ts": _now(), "session": self.session, **record}
        args = record.get("args")
        if isinstance(args, Mapping) and "changes" in args:
            if isinstance(args["changes"], Mapping):
                raise ValueError("changes must be a list of [old, new, [keys]] groups")
            full["args"] = {**args, "changes": change_groups(args["changes"])}
        with self.locked():
            try:
                return _insert(self._db.conn, full)
            except sqlite3.Error as exc:
                raise _sql_error(self.path, "write", exc) from exc
            except (TypeError, ValueError) as exc:
                raise ValueError(f"record is not JSON-serialisable: {exc}") from exc

    # ------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """A consistent snapshot (one read transaction) unless inside locked()."""
        db = self._db
        with db.lock:
            conn = db.connect(create=False)
            if conn is None:
                yield conn
                return
            try:
                if db.depth:  # inside locked(): its transaction is the snapshot
                    yield conn
                    return
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _sql_error(self.path, "read", exc) from exc

    def replay(self) -> list[dict]:
        """Every record in ``seq`` order (use :meth:`snapshot` to load the state of a big one)."""
        return self.read_since(0)

    def read_since(self, seq: int) -> list[dict]:
        """Records with ``seq`` greater than ``seq`` (for polling changes made by other tabs)."""
        seq = check_int("seq", seq, 0)
        with self._reading() as conn:
            if conn is None:
                return []
            rows = conn.execute("SELECT seq, session, time, op, payload FROM events "
                                "WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return [_row_record(r) for r in rows]

    def record(self, seq: int) -> dict | None:
        """The record with this ``seq``, or ``None``."""
        with self._reading() as conn:
            if conn is None:
                return None
            row = conn.execute("SELECT seq, session, time, op, payload FROM events "
                               "WHERE seq = ?", (int(seq),)).fetchone()
        return None if row is None else _row_record(row)

    def steps(self, session: str, after: int = 0) -> list[tuple[int, str, int | None]]:
        """``(seq, op, target)`` of ``session``'s records after ``after``, in order."""
        with self._reading() as conn:
            if conn is None:
                return []
            return conn.execute("SELECT seq, op, target FROM events WHERE session = ? AND seq > ? "
                                "ORDER BY seq", (session, int(after))).fetchall()

    def snapshot(self) -> tuple[int, dict[str, str]]:
        """``(last seq, {key: label})`` of every key the journal touched, read consistently."""
        with self._reading() as conn:
            if conn is None:
                return 0, {}
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            return seq, dict(conn.execute("SELECT key, label FROM labels"))

    def labels(self) -> dict[str, str]:
        """``{key: label}`` of every key the journal touched (``""`` = cleared)."""
        return self.snapshot()[1]

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` in the journal (0 when empty or missing)."""
        with self._reading() as conn:
            if conn is None:
                return 0
            return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def meta(self) -> dict[str, Any]:
        """Book-keeping (``imported_jsonl``: what was carried over from an old ``.jsonl``)."""
        with self._reading() as conn:
            if conn is None:
                return {}
            return {k: json.loads(v) for k, v in conn.execute("SELECT name, value FROM meta")}


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
