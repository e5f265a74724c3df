"""The service's records in one SQLite file (``DATA/service.db``): users, datasets, jobs.

Every call opens its own short-lived connection (WAL mode, a busy timeout), so the web
threads, the job scheduler and the worker processes can all use the file at once. Tokens
are never stored: only ``sha256(token)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    token_hash TEXT UNIQUE NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS user_projects (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project TEXT NOT NULL,
    PRIMARY KEY (user_id, project)
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    owner_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    visibility TEXT NOT NULL DEFAULT 'private',
    project TEXT,
    kind TEXT NOT NULL,            -- 'folder' (under --root) or 'upload' (own images/)
    folder TEXT NOT NULL,          -- absolute, resolved image folder
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    owner_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,           -- queued | running | done | failed
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    error TEXT,
    result TEXT,
    run_token TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
CREATE TABLE IF NOT EXISTS grants (
    folder TEXT NOT NULL,          -- relative to --root, POSIX slashes, no '..'
    user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    project TEXT,
    created REAL NOT NULL,
    CHECK ((user_id IS NULL) != (project IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS grants_one ON grants(folder, IFNULL(user_id, -1),
                                                       IFNULL(project, ''));
"""

#: columns added after the first release: (table, column, definition)
_ADDED_COLUMNS = (("users", "disabled", "INTEGER NOT NULL DEFAULT 0"),)

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PROJECT_NAME = USER_NAME
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
SESSION_SECONDS = 7 * 24 * 3600


def dataset_dir(data_dir: str | Path, dataset_id: str) -> Path:
    """Everything the service keeps for one dataset: ``DATA/datasets/ID/``."""
    return Path(data_dir) / "datasets" / dataset_id


class RecordError(ValueError):
    """A bad user, project or record value (names the value)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class DB:
    """The service database at ``path`` (created with its tables on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as c:
            c.executescript(SCHEMA)
            for table, col, definition in _ADDED_COLUMNS:  # a database of an older release
                have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}
                if col not in have:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {col} {definition}")

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            yield con
        finally:
            con.close()

    def one(self, sql: str, args: tuple = ()) -> dict | None:
        with self.connect() as c:
            row = c.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self.connect() as c:
            return [dict(r) for r in c.execute(sql, args).fetchall()]

    def run(self, sql: str, args: tuple = ()) -> int:
        """Execute one statement; return the number of rows changed."""
        with self.connect() as c:
            return c.execute(sql, args).rowcount

    # ------------------------------------------------------------------ users
    def add_user(self, name: str, *, admin: bool = False, projects: list[str] = ()) -> str:
        """Create user ``name``; return its API token (shown once, stored hashed)."""
        if not isinstance(name, str) or not USER_NAME.match(name):
            raise RecordError(f"user name {name!r} must be 1-64 letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit")
        for p in projects:
            if not isinstance(p, str) or not PROJECT_NAME.match(p):
                raise RecordError(f"project name {p!r} must be 1-64 letters, digits, '.', '_' "
                                  "or '-'")
        token = new_token()
        with self.connect() as c:
            try:
                c.execute("BEGIN IMMEDIATE")
                cur = c.execute("INSERT INTO users(name, token_hash, admin, created) "
                                "VALUES (?, ?, ?, ?)",
                                (name, token_hash(token), int(bool(admin)), time.time()))
                for p in dict.fromkeys(projects):
                    c.execute("INSERT INTO user_projects VALUES (?, ?)", (cur.lastrowid, p))
                c.execute("COMMIT")
            except sqlite3.IntegrityError:
                c.execute("ROLLBACK")
                raise RecordError(f"user {name!r} exists already") from None
        return token

    def user_id(self, name: str) -> int:
        """The id of user ``name``; RecordError if there is none."""
        u = self.one("SELECT id FROM users WHERE name = ?", (name,))
        if u is None:
            raise RecordError(f"no user named {name!r}")
        return u["id"]

    def remove_user(self, name: str, *, transfer_to: str | None = None,
                    delete_datasets: bool = False) -> list[str]:
        """Delete user ``name`` (their sessions and grants too).

        Their datasets are never dropped silently: with ``transfer_to`` (an admin's name)
        they change owner; with ``delete_datasets`` their records go and the returned ids
        name the folders (``dataset_dir``) the caller deletes; with neither, a user who owns
        datasets is refused (RecordError naming how many). Queued jobs of deleted datasets
        are cancelled. Returns the ids of the deleted datasets."""
        uid = self.user_id(name)
        if transfer_to is not None:
            heir = self.one("SELECT id, admin FROM users WHERE name = ?", (transfer_to,))
            if heir is None or not heir["admin"] or heir["id"] == uid:
                raise RecordError(f"transfer_to {transfer_to!r} must name another user who is "
                                  "an admin")
        with self.connect() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                ids = [r["id"] for r in c.execute("SELECT id FROM datasets WHERE owner_id = ?",
                                                  (uid,))]
                if ids and transfer_to is not None:
                    c.execute("UPDATE datasets SET owner_id = ? WHERE owner_id = ?",
                              (heir["id"], uid))
                    ids = []
                elif ids and delete_datasets:
                    c.executemany("UPDATE jobs SET state = 'cancelled', error = ?, finished = ? "
                                  "WHERE dataset_id = ? AND state = 'queued'",
                                  [("the dataset's owner was removed", time.time(), d)
                                   for d in ids])
                    c.execute("DELETE FROM datasets WHERE owner_id = ?", (uid,))
                elif ids:
                    raise RecordError(
                        f"user {name!r} owns {len(ids)} dataset(s); transfer them to an admin "
                        "(--transfer-to ADMIN) or delete them (--delete-datasets)")
                c.execute("DELETE FROM users WHERE id = ?", (uid,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return ids

    def rotate_token(self, name: str) -> str:
        """A new token for ``name`` (the old one and every browser session stop working; a
        disabled user is enabled again). Returns the token."""
        token = new_token()
        uid = self.user_id(name)
        with self.connect() as c:
            c.execute("UPDATE users SET token_hash = ?, disabled = 0 WHERE id = ?",
                      (token_hash(token), uid))
            c.execute("DELETE FROM sessions WHERE user_id = ?", (uid,))
        return token

    def disable_user(self, name: str) -> None:
        """Revoke ``name``: the token and every browser session stop working; the user, their
        datasets and grants stay (``rotate_token`` gives them a new token)."""
        uid = self.user_id(name)
        with self.connect() as c:
            # a fresh random hash: the old token can never match again, even if re-enabled
            c.execute("UPDATE users SET token_hash = ?, disabled = 1 WHERE id = ?",
                      (token_hash(new_token()), uid))
            c.execute("DELETE FROM sessions WHERE user_id = ?", (uid,))

    def users(self) -> list[dict]:
        out = self.all("SELECT id, name, admin, disabled, created FROM users ORDER BY name")
        for u in out:
            u["projects"] = self.projects_of(u["id"])
            u["admin"] = bool(u["admin"])
            u["disabled"] = bool(u["disabled"])
        return out

    def projects_of(self, user_id: int) -> list[str]:
        return [r["project"] for r in self.all(
            "SELECT project FROM user_projects WHERE user_id = ? ORDER BY project", (user_id,))]

    def user_by_token(self, token: str) -> dict | None:
        if not token or len(token) > 200:
            return None
        u = self.one("SELECT id, name, admin FROM users WHERE token_hash = ? AND disabled = 0",
                     (token_hash(token),))
        return self._complete(u)

    def _complete(self, u: dict | None) -> dict | None:
        if u is None:
            return None
        u["admin"] = bool(u["admin"])
        u["projects"] = self.projects_of(u["id"])
        return u

    # ------------------------------------------------------------------ folder grants
    def grant(self, folder: str, *, user: str | None = None, project: str | None = None) -> None:
        """Let ``user`` (a name) or the members of ``project`` register ``folder`` (relative
        to --root) and its sub-folders (explorer.service.access)."""
        if (user is None) == (project is None):
            raise RecordError("grant a folder to a user or to a project (one of them)")
        if project is not None and not PROJECT_NAME.match(project):
            raise RecordError(f"project name {project!r} must be 1-64 letters, digits, '.', "
                              "'_' or '-'")
        uid = self.user_id(user) if user is not None else None
        self.run("INSERT OR IGNORE INTO grants(folder, user_id, project, created) "
                 "VALUES (?, ?, ?, ?)", (folder, uid, project, time.time()))

    def revoke_grant(self, folder: str, *, user: str | None = None,
                     project: str | None = None) -> bool:
        uid = self.user_id(user) if user is not None else None
        return self.run("DELETE FROM grants WHERE folder = ? AND user_id IS ? AND project IS ?",
                        (folder, uid, project)) > 0

    def grants_for(self, user: dict) -> list[str]:
        """The folders (relative to --root) granted to ``user`` or to one of their projects."""
        marks = ",".join("?" * len(user["projects"]))
        sql = "SELECT DISTINCT folder FROM grants WHERE user_id = ?"
        if marks:
            sql += f" OR project IN ({marks})"
        return [r["folder"] for r in self.all(sql + " ORDER BY folder",
                                              (user["id"], *user["projects"]))]

    # ------------------------------------------------------------------ browser sessions
    def new_session(self, user_id: int) -> str:
        sid = new_token()
        now = time.time()
        with self.connect() as c:
            c.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            c.execute("INSERT INTO sessions VALUES (?, ?, ?)",
                      (token_hash(sid), user_id, now + SESSION_SECONDS))
        return sid

    def user_by_session(self, sid: str) -> dict | None:
        if not sid or len(sid) > 200:
            return None
        u = self.one("SELECT u.id, u.name, u.admin FROM sessions s JOIN users u "
                     "ON u.id = s.user_id WHERE s.hash = ? AND s.expires > ? "
                     "AND u.disabled = 0",
                     (token_hash(sid), time.time()))
        return self._complete(u)

    def end_session(self, sid: str) -> None:
        self.run("DELETE FROM sessions WHERE hash = ?", (token_hash(sid),))

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> dict | None:
        j = self.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if j is not None:
            j["params"] = json.loads(j["params"])
            j["result"] = json.loads(j["result"]) if j["result"] else None
        return j

    def set_progress(self, job_id: str, run_token: str, progress: float, stage: str) -> None:
        self.run("UPDATE jobs SET progress = ?, stage = ? WHERE id = ? AND run_token = ? "
                 "AND state = 'running'", (float(progress), stage, job_id, run_token))

    def finish(self, job_id: str, run_token: str | None, state: str, *, error: str | None = None,
               result: Any = None) -> bool:
        """Mark a running job done or failed; only the run that holds ``run_token`` may."""
        sql = ("UPDATE jobs SET state = ?, error = ?, result = ?, finished = ?, pid = NULL, "
               "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END "
               "WHERE id = ? AND state = 'running'")
        args: tuple = (state, error, json.dumps(result) if result is not None else None,
                       time.time(), state, job_id)
        if run_token is not None:
            sql += " AND run_token = ?"
            args += (run_token,)
        return self.run(sql, args) > 0
