"""Datasets: register a folder, upload images, list, read, rename/share, delete, add URLs."""

from __future__ import annotations

import asyncio
import secrets
import shutil

from fastapi import APIRouter, Depends, Request

from explorer.service.apps import AppServers
from explorer.service.build_request import BuildIn, build_methods
from explorer.service.config import ServiceConfig
from explorer.service.db import DB, dataset_dir
from explorer.service.deps import (can_see, current_user, dataset_for, get_apps, get_config,
                                   get_db, get_queue, owned_dataset, visible_dataset)
from explorer.service.errors import ServiceError
from explorer.service.fetch import download
from explorer.service.jobs import JobQueue
from explorer.service.models import DatasetIn, DatasetPatch, URLsIn, clean_text
from explorer.service.records import (describe, folder_under_root, insert_dataset, paths_of,
                                      project_for)
from explorer.service.uploads import Intake, RequestTooLarge, receive_multipart

router = APIRouter(prefix="/api/datasets", tags=["datasets"])


@router.post("", status_code=201)
def create_dataset(body: DatasetIn, user: dict = Depends(current_user),
                   config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """Register a folder under the server's --root (or an empty dataset to upload into)."""
    project = project_for(user, body.visibility, body.project)
    if body.folder is not None:
        folder, kind = folder_under_root(config, body.folder), "folder"
        ds_id = insert_dataset(db, user, body.name, kind, folder, body.visibility, project)
        dataset_dir(config.data, ds_id).mkdir(parents=True, exist_ok=True)
    else:
        ds_id = secrets.token_hex(8)
        images = dataset_dir(config.data, ds_id) / "images"
        images.mkdir(parents=True)
        insert_dataset(db, user, body.name, "upload", images, body.visibility, project, ds_id)
    return describe(config, db, dataset_for(db, user, ds_id))


@router.post("/upload", status_code=201, openapi_extra={
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": {
            "name": {"type": "string", "maxLength": 200},
            "visibility": {"type": "string", "enum": ["private", "project"]},
            "project": {"type": "string", "maxLength": 64},
            "build": {"type": "string", "enum": ["", "timm", "phash", "ssim", "orb",
                                                 "minhash", "tm"],
                      "description": "queue a build with this method right away"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "images and/or zips of images"}}}}}}})
async def upload_dataset(request: Request, user: dict = Depends(current_user),
                         config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db),
                         queue: JobQueue = Depends(get_queue)):
    """Create a dataset from uploaded images and zips (streamed to disk, checked, every
    skipped file reported). Fields: ``name``, ``visibility``, ``project``, ``files``, and
    ``build`` (a method: queue a build at once; the answer's ``job``)."""
    ds_id = secrets.token_hex(8)
    d = dataset_dir(config.data, ds_id)
    try:
        fields, files = await receive_multipart(request, d / "staging", config.limits)
        name = fields.get("name") or "upload"
        vis = fields.get("visibility") or "private"
        try:
            name = clean_text(name, "name")[:200]
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None
        if vis not in ("private", "project"):
            raise ServiceError(422, f"visibility must be 'private' or 'project', got {vis!r}")
        project = project_for(user, vis, fields.get("project") or None)
        if not files:
            raise ServiceError(422, "no files in the upload (send them as 'files')")
        intake = Intake(d / "images", config.limits)

        def take():
            for tmp, fname in files:
                with open(tmp, "rb") as fh:
                    is_zip = fh.read(4) == b"PK\x03\x04"
                (intake.add_zip if is_zip else intake.add_file)(tmp, fname)

        await asyncio.to_thread(take)
        if intake.added == 0:
            raise ServiceError(422, "none of the uploaded files is an image this service "
                                    "reads", report=intake.report)
        method = fields.get("build") or ""
        if method and method not in build_methods():
            raise ServiceError(422, f"build must be a method name, got {method!r}")
        insert_dataset(db, user, name, "upload", d / "images", vis, project, ds_id)
        job = queue.submit(ds_id, user["id"], BuildIn(method=method).model_dump()) \
            if method else None
    except RequestTooLarge as exc:
        shutil.rmtree(d, ignore_errors=True)
        raise ServiceError(413, str(exc)) from None
    except ValueError as exc:
        shutil.rmtree(d, ignore_errors=True)
        raise ServiceError(400 if "multipart" in str(exc) else 422, str(exc)) from None
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(d / "staging", ignore_errors=True)
    out = describe(config, db, dataset_for(db, user, ds_id))
    out.update(added=intake.added, skipped=intake.skipped, report=intake.report, job=job)
    return out


@router.get("")
def list_datasets(user: dict = Depends(current_user), config: ServiceConfig = Depends(get_config),
                  db: DB = Depends(get_db)):
    """Every dataset the caller may see."""
    rows = db.all("SELECT d.*, u.name AS owner FROM datasets d JOIN users u "
                  "ON u.id = d.owner_id ORDER BY d.created")
    return {"datasets": [describe(config, db, ds) for ds in rows if can_see(user, ds)]}


@router.get("/{dataset_id}")
def get_dataset(ds: dict = Depends(visible_dataset), config: ServiceConfig = Depends(get_config),
                db: DB = Depends(get_db)):
    return describe(config, db, ds)


@router.patch("/{dataset_id}")
def patch_dataset(dataset_id: str, body: DatasetPatch, user: dict = Depends(current_user),
                  config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db),
                  apps: AppServers = Depends(get_apps)):
    """Rename, or share with one of the owner's projects (``visibility: project``)."""
    ds = dataset_for(db, user, dataset_id, change=True)
    owner = db._complete(db.one("SELECT id, name, admin FROM users WHERE id = ?",
                                (ds["owner_id"],)))
    vis = body.visibility or ds["visibility"]
    project = ds["project"]
    if body.visibility is not None or body.project is not None:
        project = project_for(owner if not user["admin"] else {**owner, "admin": True},
                              vis, body.project, current=ds["project"])
    db.run("UPDATE datasets SET name = ?, visibility = ?, project = ? WHERE id = ?",
           (body.name or ds["name"], vis, project, ds["id"]))
    apps.live.recheck(ds_id=ds["id"])  # an app socket of someone who lost access closes
    return describe(config, db, dataset_for(db, user, dataset_id))


@router.delete("/{dataset_id}")
def delete_dataset(ds: dict = Depends(owned_dataset), config: ServiceConfig = Depends(get_config),
                   db: DB = Depends(get_db), queue: JobQueue = Depends(get_queue),
                   apps: AppServers = Depends(get_apps)):
    """Delete the record and everything the service keeps for it (never the folder
    under --root)."""
    if queue.running_for(ds["id"]):
        raise ServiceError(409, "a build of this dataset is running; delete it when the job "
                                "has ended")
    queue.cancel_queued(ds["id"], "the dataset was deleted")
    apps.stop(ds["id"])
    db.run("DELETE FROM datasets WHERE id = ?", (ds["id"],))
    apps.live.recheck(ds_id=ds["id"])
    shutil.rmtree(dataset_dir(config.data, ds["id"]), ignore_errors=True)
    return {"deleted": ds["id"]}


@router.post("/{dataset_id}/urls")
async def add_urls(dataset_id: str, body: URLsIn, user: dict = Depends(current_user),
                   config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """Download images from http(s) URLs into an uploaded dataset; a report per URL."""
    ds = dataset_for(db, user, dataset_id, change=True)
    if ds["kind"] != "upload":
        raise ServiceError(409, "this dataset is a folder under the server's root; "
                                "download into an uploaded (or empty) dataset instead")
    p = paths_of(config, ds)
    intake = Intake(p["images"], config.limits)
    staging = p["dir"] / f"staging-{secrets.token_hex(4)}"
    try:
        report = await download(body.urls, p["images"], staging, config.fetch, intake)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"added": sum(r["ok"] for r in report),
            "skipped": sum(not r["ok"] for r in report), "report": report}
