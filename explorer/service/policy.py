"""Who may register which folder, and how much one user may ask of the service.

Access model for folders under ``--root`` (review 2026-12-06 N5), decided on the folder's
path relative to ``--root`` *after* symlinks (and on the requested path before, so that a
refused user learns nothing about what exists):

* ``users/NAME/...`` belongs to user NAME;
* ``projects/P/...`` belongs to the members of project P;
* everything else belongs to admins;
* an admin (``explorer users grant FOLDER --user NAME | --project P``) can give any folder
  and its sub-folders to a user or to a project's members as well.

Admins may register every folder. Who may *see* a registered dataset is a separate rule
(owner, admins, and the project it is shared with: ``deps.can_see``).

Quotas (review N9, N14) are per user: datasets, queued or running jobs, bytes kept under
``--data`` for their datasets, uploads at once; and per job: the wall-clock limit.

``private_data`` keeps ``--data`` private (review N12).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

USERS = "users"
PROJECTS = "projects"


class FolderRefused(PermissionError):
    """The user may not register this folder (answered 403)."""


def rel_folder(rel: str) -> str:
    """``rel`` (a folder relative to --root) as normalised POSIX text; ValueError naming it if
    it is absolute, has a drive, ``..``, a NUL, or is empty."""
    if not isinstance(rel, str) or "\x00" in rel or not rel.strip():
        raise ValueError(f"folder {rel!r} is not a folder name")
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or ".." in parts:
        raise ValueError(f"folder {rel!r} must be relative to the server's root, without '..'")
    return "/".join(parts)


def folder_belongs_to(rel: str) -> tuple[str, str | None]:
    """``("user", NAME)``, ``("project", P)`` or ``("admins", None)`` for a normalised
    folder ``rel`` (see the module docstring)."""
    parts = PurePosixPath(rel).parts
    if len(parts) >= 2 and parts[0] == USERS:
        return "user", parts[1]
    if len(parts) >= 2 and parts[0] == PROJECTS:
        return "project", parts[1]
    return "admins", None


def _under(rel: str, folder: str) -> bool:
    return folder == "" or rel == folder or rel.startswith(folder + "/")


def may_register(user: dict, rel: str, grants: list[str]) -> bool:
    """True if ``user`` (``{"name", "admin", "projects"}``) may register the normalised folder
    ``rel``; ``grants``: the folders granted to them or to their projects."""
    if user["admin"]:
        return True
    kind, who = folder_belongs_to(rel)
    if (kind == "user" and who == user["name"]) or \
            (kind == "project" and who in user["projects"]):
        return True
    return any(_under(rel, g) for g in grants)


def check_folder(user: dict, rel: str, grants: list[str]) -> None:
    """Raise :class:`FolderRefused` if ``user`` may not register ``rel``."""
    if not may_register(user, rel, grants):
        kind, who = folder_belongs_to(rel)
        whose = {"user": f"user {who}", "project": f"the members of project {who}",
                 "admins": "admins"}[kind]
        mine = f"{USERS}/{user['name']}/"
        raise FolderRefused(f"folder {rel!r} belongs to {whose}; you may register folders "
                            f"under {mine}, your projects' {PROJECTS}/P/ and folders an admin "
                            "granted you")


# --------------------------------------------------------------------------- quotas
@dataclass(frozen=True)
class Quotas:
    """What one user may ask of the service at once (counts; bytes; seconds)."""

    max_datasets: int = 100
    max_jobs: int = 10                 # queued or running, per user
    max_bytes: int = 50 * 2**30        # under --data for the user's datasets
    max_uploads: int = 2               # upload or URL requests at once, per user
    max_uploads_total: int = 8         # the same, for the whole service
    job_seconds: float = 6 * 3600.0    # a build's wall-clock limit

    def __post_init__(self):
        for k, v in self.__dict__.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"quota {k} must be a positive number, got {v!r}")


class QuotaExceeded(Exception):
    """A per-user limit is reached (answered 429 with the message)."""


def used_bytes(folders: list[Path]) -> int:
    """Bytes of the regular files under ``folders`` (symlinks not followed)."""
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                total += st.st_size
    return total


class UploadSlots:
    """At most ``Quotas.max_uploads`` intakes per user and ``max_uploads_total`` in all;
    ``with slots.take(user_id):`` or QuotaExceeded."""

    def __init__(self, quotas: Quotas):
        self.quotas = quotas
        self._lock = threading.Lock()
        self._per_user: dict[int, int] = {}

    def take(self, user_id: int) -> "_Slot":
        with self._lock:
            if sum(self._per_user.values()) >= self.quotas.max_uploads_total:
                raise QuotaExceeded(f"the service takes {self.quotas.max_uploads_total} uploads "
                                    "at once; try again when one has finished")
            if self._per_user.get(user_id, 0) >= self.quotas.max_uploads:
                raise QuotaExceeded(f"you have {self.quotas.max_uploads} uploads running; "
                                    "wait until one has finished")
            self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        return _Slot(self, user_id)

    def _give_back(self, user_id: int) -> None:
        with self._lock:
            self._per_user[user_id] -= 1
            if not self._per_user[user_id]:
                del self._per_user[user_id]

    def in_use(self) -> int:
        with self._lock:
            return sum(self._per_user.values())


class _Slot:
    def __init__(self, slots: UploadSlots, user_id: int):
        self.slots, self.user_id, self._open = slots, user_id, True

    def release(self) -> None:
        if self._open:
            self._open = False
            self.slots._give_back(self.user_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------- N12
def private_data(data: str | os.PathLike) -> Path:
    """Make ``data`` (``--data``) private to this account: umask 077 for this process (every
    file it writes from now on is 0600, every folder 0700), the folder created 0700 or
    chmod-ed to 0700, and the files already at its top (``service.db``, its WAL) chmod-ed
    to 0600. Returns the folder."""
    os.umask(0o077)
    path = Path(data).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            os.chmod(child, 0o600)
    return path
