"""What the service keeps for a dataset, and the rules for its folders and projects.

Plain functions over a :class:`ServiceConfig` and the records; the routes call them.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import Optional

from explorer import dataset
from explorer.service.config import ServiceConfig
from explorer.service.db import DB, PROJECT_NAME, dataset_dir
from explorer.service.errors import ServiceError
from explorer.service.policy import FolderRefused, check_folder, rel_folder, used_bytes


def paths_of(config: ServiceConfig, ds: dict) -> dict[str, Path]:
    d = dataset_dir(config.data, ds["id"])
    return {"dir": d, "app": d / "app", "csv": d / "app.csv", "staging": d / "staging",
            "images": d / "images"}


def built(config: ServiceConfig, ds: dict) -> dict[str, Path]:
    """The dataset's paths; 409 if it has not been built."""
    p = paths_of(config, ds)
    if not p["csv"].is_file():
        raise ServiceError(409, "the dataset has not been built yet: POST "
                                f"/api/datasets/{ds['id']}/builds and wait for the job")
    return p


def describe(config: ServiceConfig, db: DB, ds: dict) -> dict:
    p = paths_of(config, ds)
    is_built = p["csv"].is_file()
    run = None
    if is_built:
        with contextlib.suppress(ValueError):  # the CSV went away meanwhile
            run = dataset.open(p["csv"]).run
    last = db.one("SELECT id, state FROM jobs WHERE dataset_id = ? ORDER BY created DESC, "
                  "rowid DESC LIMIT 1", (ds["id"],))
    folder = None
    if ds["kind"] == "folder":
        with contextlib.suppress(ValueError):  # None: no longer under this --root
            folder = Path(ds["folder"]).relative_to(config.root).as_posix()
    return {"id": ds["id"], "name": ds["name"], "owner": ds["owner"],
            "visibility": ds["visibility"], "project": ds["project"], "kind": ds["kind"],
            "folder": folder, "created": ds["created"], "built": is_built,
            "counts": (run or {}).get("counts"),
            "last_job": last, "app": f"/apps/{ds['id']}"}


def project_for(user: dict, visibility: str, project: Optional[str], current=None) -> Optional[str]:
    if visibility == "private":
        return project if project in user["projects"] else current
    if project is None:
        project = current
    if project is None:
        if len(user["projects"]) == 1:
            return user["projects"][0]
        raise ServiceError(422, "say which of your projects may see it: \"project\": one of "
                                f"{user['projects']}" if user["projects"] else
                           "you belong to no project (explorer users add NAME --project P)")
    if not isinstance(project, str) or not PROJECT_NAME.match(project) or \
            (project not in user["projects"] and not user["admin"]):
        raise ServiceError(422, f"project {project!r} is not one of yours "
                                f"({', '.join(user['projects']) or 'none'})")
    return project


def registrable_folder(config: ServiceConfig, db: DB, user: dict, rel: str) -> Path:
    """The folder ``rel`` under --root that ``user`` may register (explorer.service.policy:
    403 if the folder, as asked or after symlinks, is not theirs; checked as asked first, so
    a refused caller learns nothing about what exists), else as :func:`folder_under_root`."""
    try:
        rel = rel_folder(rel)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    grants = db.grants_for(user)
    try:
        check_folder(user, rel, grants)
        target = folder_under_root(config, rel)
        resolved = "" if target == config.root else target.relative_to(config.root).as_posix()
        check_folder(user, resolved, grants)
    except FolderRefused as exc:
        raise ServiceError(403, str(exc)) from None
    return target


def folder_under_root(config: ServiceConfig, rel: str) -> Path:
    """The folder ``rel`` names under --root, after symlinks; ServiceError if not one."""
    try:
        parts = [p for p in rel_folder(rel).split("/") if p]
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    try:
        target = config.root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ServiceError(422, f"folder {rel!r} does not exist under the server's root") \
            from None
    if not (target == config.root or target.is_relative_to(config.root)):
        raise ServiceError(422, f"folder {rel!r} leads outside the server's root "
                                "(through a symlink); refused")
    if not target.is_dir():
        raise ServiceError(422, f"{rel!r} is not a folder")
    from explorer.paths import UnsafePath, check_image_root

    try:
        check_image_root(target)  # the project's one rule for image folders
    except UnsafePath as exc:
        raise ServiceError(422, str(exc)) from None
    if target == config.data or target.is_relative_to(config.data) or \
            config.data.is_relative_to(target):
        raise ServiceError(422, f"folder {rel!r} holds the service's own data; refused")
    return target


def image_folder_of(config: ServiceConfig, ds: dict) -> Path:
    """The dataset's image folder, checked again now (after symlinks): under --root for a
    registered folder, under --data for uploads. 409 if that no longer holds."""
    base = config.root if ds["kind"] == "folder" else config.data
    try:
        folder = Path(ds["folder"]).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ServiceError(409, "the dataset's image folder is gone") from None
    if not folder.is_dir() or not (folder == base or folder.is_relative_to(base)):
        raise ServiceError(409, "the dataset's image folder is no longer under the "
                                "server's root; register the folder again")
    return folder


def check_quota(config: ServiceConfig, db: DB, user: dict, *, dataset: bool = False,
                jobs: int | None = None) -> int:
    """429 when ``user`` is at a limit of ``config.quotas``: their datasets (with
    ``dataset``: about to add one), their queued or running ``jobs`` (a count), the bytes
    kept under --data for their datasets. Returns the bytes they may still add."""
    q = config.quotas
    ids = [r["id"] for r in db.all("SELECT id FROM datasets WHERE owner_id = ?", (user["id"],))]
    if dataset and len(ids) >= q.max_datasets:
        raise ServiceError(429, f"you have {len(ids)} datasets, the limit per user; delete "
                                "one first")
    if jobs is not None and jobs >= q.max_jobs:
        raise ServiceError(429, f"you have {jobs} builds queued or running, the limit per "
                                "user; wait for one to end or cancel one (DELETE /api/jobs/ID)")
    used = used_bytes([dataset_dir(config.data, i) for i in ids])
    if used >= q.max_bytes:
        raise ServiceError(429, f"your datasets keep {used:,} bytes on the server, the limit "
                                f"is {q.max_bytes:,}; delete some first")
    return q.max_bytes - used


def insert_dataset(db: DB, user, name, kind, folder: Path, visibility, project,
                   ds_id=None) -> str:
    ds_id = ds_id or secrets.token_hex(8)
    db.run("INSERT INTO datasets(id, owner_id, name, visibility, project, kind, folder, "
           "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
           (ds_id, user["id"], name, visibility, project, kind, str(folder), time.time()))
    return ds_id
