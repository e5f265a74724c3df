"""The FastAPI app of ``explorer serve``: the API under ``/api``, docs at ``/docs``, each
dataset's explorer app at ``/apps/{id}``.

Rules every endpoint keeps:

* no valid ``Authorization: Bearer TOKEN`` -> 401, nothing read or changed;
* a dataset the caller may not see -> 404, the same answer as for one that does not exist
  (owner, admins, and members of its project when ``visibility`` is ``project``);
* changing a dataset (rename, share, delete, build, add images) is for its owner and admins
  (403 for project members); labels may be written by everyone who sees the dataset;
* every error is JSON ``{"error": message}`` with a 4xx status; a 500 is a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (FileResponse, HTMLResponse, JSONResponse, RedirectResponse,
                               StreamingResponse)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from explorer.options import build_request_model
from explorer.service.apps import AppServers, AppUnavailable, proxy_http, proxy_websocket
from explorer.service.db import DB, PROJECT_NAME, dataset_dir
from explorer.service.fetch import FetchRules, download
from explorer.service.jobs import JobQueue
from explorer.service.streams import stream_from
from explorer.service.uploads import Intake, Limits, RequestTooLarge, receive_multipart

COOKIE = "explorer_session"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class ServiceConfig:
    """What ``explorer serve`` was started with."""

    root: Path
    data: Path
    concurrency: int = 1
    allow_private_urls: bool = False
    limits: Limits = field(default_factory=Limits)
    fetch: FetchRules | None = None
    app_idle: float = 1800.0
    url_timeout: float = 10.0

    def __post_init__(self):
        from explorer.paths import check_image_root

        self.root = check_image_root(Path(self.root).expanduser())  # UnsafePath: a ValueError
        self.data = Path(self.data).expanduser().resolve()
        self.data.mkdir(parents=True, exist_ok=True)
        if self.fetch is None:
            if not self.url_timeout > 0:
                raise ValueError(f"url_timeout must be > 0 seconds, got {self.url_timeout!r}")
            self.fetch = FetchRules(allow_private=self.allow_private_urls,
                                    max_bytes=self.limits.max_file_bytes,
                                    timeout=self.url_timeout,
                                    deadline=max(60.0, 3 * self.url_timeout))


class ServiceError(Exception):
    """An error the API answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def not_found(what: str = "dataset") -> ServiceError:
    return ServiceError(404, f"{what} not found")


# --------------------------------------------------------------------------- bodies
def _text(v: str, what: str) -> str:
    if _CONTROL.search(v):
        raise ValueError(f"{what} must not contain control characters")
    if not v.strip():
        raise ValueError(f"{what} must not be blank")
    return v.strip()


class DatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    folder: Optional[str] = Field(None, max_length=4096, description=(
        "image folder relative to the server's --root; omit for an empty dataset that "
        "uploads and URL downloads fill"))
    visibility: Literal["private", "project"] = "private"
    project: Optional[str] = Field(None, max_length=64, description=(
        "one of the owner's projects (default: the owner's only project)"))

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _text(v, "name")


class DatasetPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, min_length=1, max_length=200)
    visibility: Optional[Literal["private", "project"]] = None
    project: Optional[str] = Field(None, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return None if v is None else _text(v, "name")


#: the build request: every option of ``explorer build`` that makes sense remotely, with the
#: CLI's defaults and checks (derived from :mod:`explorer.options`)
BuildIn = build_request_model()


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["cluster", "label"] = "cluster"
    sample: Optional[float | str] = Field(None, description="share of each folder copied to "
                                          "sample/, e.g. 0.1 or \"10%\"")


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["apply", "clear", "discard", "rename", "merge"]
    keys: list[str] = Field(default_factory=list, max_length=1_000_000,
                            description="image paths (the CSV's path column)")
    label: Optional[str] = Field(None, max_length=200)
    old: Optional[str] = Field(None, max_length=200)
    new: Optional[str] = Field(None, max_length=200)
    into: Optional[str] = Field(None, max_length=200)


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=500, description="what to look for, in words")
    top: int = Field(10, ge=1, le=200)


class URLsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: list[str] = Field(min_length=1, max_length=500)


# --------------------------------------------------------------------------- the app
def create_app(config: ServiceConfig) -> FastAPI:
    db = DB(config.data / "service.db")
    queue = JobQueue(db, config.data, concurrency=config.concurrency)
    (config.data / "logs").mkdir(parents=True, exist_ok=True)
    apps = AppServers(config.data, idle=config.app_idle)
    elbow_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        queue.start()
        try:
            yield
        finally:
            apps.stop_all()
            await asyncio.to_thread(queue.stop)

    app = FastAPI(
        title="bulk image explorer",
        version=__import__("explorer").__version__,
        description="Datasets of images: upload or register, build (embed, map, cluster), read "
                    "the table, choose k, export folders, label. Send `Authorization: Bearer "
                    "TOKEN` (from `explorer users add`) with every request.",
        lifespan=lifespan,
    )
    app.state.db = db
    app.state.queue = queue
    app.state.config = config
    bearer = HTTPBearer(auto_error=False)

    # ------------------------------------------------------------------ errors as JSON
    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status,
                            headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            msg = "not found"
        return JSONResponse({"error": msg}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        details = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            details.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse({"error": "invalid request: " + "; ".join(details[:5])},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug: say so in JSON, keep serving
        import traceback

        traceback.print_exception(exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    # ------------------------------------------------------------------ users
    def current_user(cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> dict:
        if cred is None or cred.scheme.lower() != "bearer":
            raise ServiceError(401, "send Authorization: Bearer TOKEN (explorer users add)")
        user = db.user_by_token(cred.credentials)
        if user is None:
            raise ServiceError(401, "unknown or revoked token")
        return user

    def can_see(user: dict, ds: dict) -> bool:
        return (user["admin"] or ds["owner_id"] == user["id"]
                or (ds["visibility"] == "project" and ds["project"] in user["projects"]))

    def dataset_for(user: dict, ds_id: str, *, change: bool = False) -> dict:
        ds = db.one("SELECT d.*, u.name AS owner FROM datasets d JOIN users u "
                    "ON u.id = d.owner_id WHERE d.id = ?", (ds_id,)) if len(ds_id) < 64 else None
        if ds is None or not can_see(user, ds):
            raise not_found()
        if change and not (user["admin"] or ds["owner_id"] == user["id"]):
            raise ServiceError(403, "only the dataset's owner (or an admin) may change it")
        return ds

    def paths_of(ds: dict) -> dict[str, Path]:
        d = dataset_dir(config.data, ds["id"])
        return {"dir": d, "app": d / "app", "csv": d / "app.csv", "staging": d / "staging",
                "images": d / "images"}

    def describe(ds: dict) -> dict:
        p = paths_of(ds)
        built = p["csv"].is_file()
        run = None
        if built:
            with contextlib.suppress(OSError, ValueError):
                run = json.loads((p["dir"] / "app.run.json").read_text())
        last = db.one("SELECT id, state FROM jobs WHERE dataset_id = ? ORDER BY created DESC, "
                      "rowid DESC LIMIT 1", (ds["id"],))
        folder = None
        if ds["kind"] == "folder":
            with contextlib.suppress(ValueError):  # None: no longer under this --root
                folder = Path(ds["folder"]).relative_to(config.root).as_posix()
        return {"id": ds["id"], "name": ds["name"], "owner": ds["owner"],
                "visibility": ds["visibility"], "project": ds["project"], "kind": ds["kind"],
                "folder": folder, "created": ds["created"], "built": built,
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

    def folder_under_root(rel: str) -> Path:
        """The folder ``rel`` names under --root, after symlinks; ServiceError if not one."""
        if "\x00" in rel or not rel.strip():
            raise ServiceError(422, f"folder {rel!r} is not a folder name")
        parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
        if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or ".." in parts:
            raise ServiceError(422, f"folder {rel!r} must be relative to the server's root, "
                                    "without '..'")
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

    def image_folder_of(ds: dict) -> Path:
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

    def insert_dataset(user, name, kind, folder: Path, visibility, project, ds_id=None) -> str:
        ds_id = ds_id or secrets.token_hex(8)
        db.run("INSERT INTO datasets(id, owner_id, name, visibility, project, kind, folder, "
               "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (ds_id, user["id"], name, visibility, project, kind, str(folder), time.time()))
        return ds_id

    # ------------------------------------------------------------------ endpoints
    @app.get("/api/me", tags=["users"])
    def me(user: dict = Depends(current_user)):
        """Who the token belongs to."""
        return {"name": user["name"], "admin": user["admin"], "projects": user["projects"]}

    @app.post("/api/datasets", status_code=201, tags=["datasets"])
    def create_dataset(body: DatasetIn, user: dict = Depends(current_user)):
        """Register a folder under the server's --root (or an empty dataset to upload into)."""
        project = project_for(user, body.visibility, body.project)
        if body.folder is not None:
            folder, kind = folder_under_root(body.folder), "folder"
            ds_id = insert_dataset(user, body.name, kind, folder, body.visibility, project)
            dataset_dir(config.data, ds_id).mkdir(parents=True, exist_ok=True)
        else:
            ds_id = secrets.token_hex(8)
            images = dataset_dir(config.data, ds_id) / "images"
            images.mkdir(parents=True)
            insert_dataset(user, body.name, "upload", images, body.visibility, project, ds_id)
        return describe(dataset_for(user, ds_id))

    @app.post("/api/datasets/upload", status_code=201, tags=["datasets"], openapi_extra={
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
    async def upload_dataset(request: Request, user: dict = Depends(current_user)):
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
                name = _text(name, "name")[:200]
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
            if method and method not in BuildIn.model_fields["method"].annotation.__args__:
                raise ServiceError(422, f"build must be a method name, got {method!r}")
            insert_dataset(user, name, "upload", d / "images", vis, project, ds_id)
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
        out = describe(dataset_for(user, ds_id))
        out.update(added=intake.added, skipped=intake.skipped, report=intake.report, job=job)
        return out

    @app.get("/api/datasets", tags=["datasets"])
    def list_datasets(user: dict = Depends(current_user)):
        """Every dataset the caller may see."""
        rows = db.all("SELECT d.*, u.name AS owner FROM datasets d JOIN users u "
                      "ON u.id = d.owner_id ORDER BY d.created")
        return {"datasets": [describe(ds) for ds in rows if can_see(user, ds)]}

    @app.get("/api/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: str, user: dict = Depends(current_user)):
        return describe(dataset_for(user, dataset_id))

    @app.patch("/api/datasets/{dataset_id}", tags=["datasets"])
    def patch_dataset(dataset_id: str, body: DatasetPatch, user: dict = Depends(current_user)):
        """Rename, or share with one of the owner's projects (``visibility: project``)."""
        ds = dataset_for(user, dataset_id, change=True)
        owner = db._complete(db.one("SELECT id, name, admin FROM users WHERE id = ?",
                                    (ds["owner_id"],)))
        vis = body.visibility or ds["visibility"]
        project = ds["project"]
        if body.visibility is not None or body.project is not None:
            project = project_for(owner if not user["admin"] else {**owner, "admin": True},
                                  vis, body.project, current=ds["project"])
        db.run("UPDATE datasets SET name = ?, visibility = ?, project = ? WHERE id = ?",
               (body.name or ds["name"], vis, project, ds["id"]))
        return describe(dataset_for(user, dataset_id))

    @app.delete("/api/datasets/{dataset_id}", tags=["datasets"])
    def delete_dataset(dataset_id: str, user: dict = Depends(current_user)):
        """Delete the record and everything the service keeps for it (never the folder
        under --root)."""
        ds = dataset_for(user, dataset_id, change=True)
        if queue.running_for(ds["id"]):
            raise ServiceError(409, "a build of this dataset is running; delete it when the job "
                                    "has ended")
        queue.cancel_queued(ds["id"], "the dataset was deleted")
        apps.stop(ds["id"])
        db.run("DELETE FROM datasets WHERE id = ?", (ds["id"],))
        shutil.rmtree(dataset_dir(config.data, ds["id"]), ignore_errors=True)
        return {"deleted": ds["id"]}

    @app.post("/api/datasets/{dataset_id}/urls", tags=["datasets"])
    async def add_urls(dataset_id: str, body: URLsIn, user: dict = Depends(current_user)):
        """Download images from http(s) URLs into an uploaded dataset; a report per URL."""
        ds = dataset_for(user, dataset_id, change=True)
        if ds["kind"] != "upload":
            raise ServiceError(409, "this dataset is a folder under the server's root; "
                                    "download into an uploaded (or empty) dataset instead")
        p = paths_of(ds)
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

    @app.post("/api/datasets/{dataset_id}/builds", status_code=202, tags=["jobs"])
    def start_build(dataset_id: str, body: Optional[BuildIn] = None,
                    user: dict = Depends(current_user)):
        """Queue a build (embed, map, cluster) of the dataset; poll ``/api/jobs/{job}``."""
        ds = dataset_for(user, dataset_id, change=True)
        image_folder_of(ds)
        params = (body or BuildIn()).model_dump()
        job_id = queue.submit(ds["id"], user["id"], params)
        return {"job": job_id, "state": "queued", "url": f"/api/jobs/{job_id}"}

    def job_view(j: dict) -> dict:
        return {"id": j["id"], "dataset": j["dataset_id"], "state": j["state"],
                "progress": round(float(j["progress"]), 3), "stage": j["stage"],
                "error": j["error"], "result": j["result"], "params": j["params"],
                "created": j["created"], "started": j["started"], "finished": j["finished"]}

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, user: dict = Depends(current_user)):
        """A job's state (queued, running, done, failed), progress (0-1) and error."""
        j = db.job(job_id) if len(job_id) < 64 else None
        if j is None:
            raise not_found("job")
        ds = db.one("SELECT * FROM datasets WHERE id = ?", (j["dataset_id"],))
        if not (user["admin"] or j["owner_id"] == user["id"] or (ds and can_see(user, ds))):
            raise not_found("job")
        return job_view(j)

    @app.get("/api/jobs", tags=["jobs"])
    def list_jobs(user: dict = Depends(current_user),
                  state: Optional[Literal["queued", "running", "done", "failed"]] = None):
        """The caller's jobs (every job for admins), newest first."""
        sql = "SELECT id FROM jobs" + ("" if user["admin"] else " WHERE owner_id = ?")
        args: tuple = () if user["admin"] else (user["id"],)
        if state:
            sql += (" AND" if "WHERE" in sql else " WHERE") + " state = ?"
            args += (state,)
        rows = db.all(sql + " ORDER BY created DESC LIMIT 1000", args)
        return {"jobs": [job_view(db.job(r["id"])) for r in rows]}

    def built(ds: dict) -> dict[str, Path]:
        p = paths_of(ds)
        if not p["csv"].is_file():
            raise ServiceError(409, "the dataset has not been built yet: POST "
                                    f"/api/datasets/{ds['id']}/builds and wait for the job")
        return p

    @app.get("/api/datasets/{dataset_id}/table.csv", tags=["results"],
             response_class=FileResponse)
    def table_csv(dataset_id: str, user: dict = Depends(current_user)):
        """The table written by the last build (schema: explorer.table)."""
        p = built(dataset_for(user, dataset_id))
        return FileResponse(p["csv"], media_type="text/csv",
                            filename=f"{dataset_for(user, dataset_id)['id']}.csv")

    @app.get("/api/datasets/{dataset_id}/elbow", tags=["results"])
    async def elbow(dataset_id: str, user: dict = Depends(current_user),
                    k_max: int = Query(15, ge=2, le=50)):
        """KMeans inertia over k = 1..k_max on the dataset's features, and the k at the elbow."""
        p = built(dataset_for(user, dataset_id))
        feats = p["dir"] / "app.features.npy"
        if not feats.is_file():
            raise ServiceError(409, "the build wrote no features (app.features.npy)")
        cache = p["dir"] / "elbow.json"
        key = f"{feats.stat().st_mtime_ns}:{feats.stat().st_size}:{k_max}"

        def compute():
            with elbow_lock:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    c = json.loads(cache.read_text())
                    if c["key"] == key:
                        return c["elbow"]
                import numpy as np

                from explorer import cluster as cluster_mod

                X = np.load(feats).astype(np.float32)
                if len(X) > 20_000:
                    X = X[np.random.default_rng(0).choice(len(X), 20_000, replace=False)]
                res = cluster_mod.cluster(X, "kmeans", k_max=k_max)
                if res.elbow is None:
                    out = {"k": [], "inertia": [], "suggested_k": int(res.n_clusters)
                           if hasattr(res, "n_clusters") else 1, "notes": list(res.notes)}
                else:
                    out = {"k": [int(k) for k in res.elbow["k"]],
                           "inertia": [float(v) for v in res.elbow["inertia"]],
                           "suggested_k": int(res.elbow["chosen_k"]), "notes": list(res.notes)}
                out["points"] = int(len(X))
                from explorer.table import atomic_write_text

                atomic_write_text(cache, json.dumps({"key": key, "elbow": out}))
                return out

        try:
            return await asyncio.to_thread(compute)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None

    def label_book(p: dict[str, Path], session: str):
        from explorer.journal import journal_for
        from explorer.labels import LabelBook
        from explorer.table import read_table

        df = read_table(p["csv"])
        keys = df["path"].fillna("").astype(str).tolist()
        initial = {}
        if "label" in df.columns:
            vals = df["label"]
            initial = {k: ("" if v is None or (isinstance(v, float) and v != v) else str(v))
                       for k, v in zip(keys, vals.tolist())}
        return df, LabelBook.from_journal(journal_for(p["csv"], session=session), keys=keys,
                                          initial=initial)

    @app.get("/api/datasets/{dataset_id}/labels", tags=["labels"])
    def get_labels(dataset_id: str, user: dict = Depends(current_user)):
        """Every labelled image (path -> label) and the count per label, as the app sees them."""
        p = built(dataset_for(user, dataset_id))
        try:
            _, book = label_book(p, f"api-{user['name']}")
        except OSError as exc:  # the journal cannot be read (explorer.journal.JournalError)
            raise ServiceError(503, f"the labels cannot be read now: {exc}") from None
        return {"labels": book.as_dict(), "counts": book.counts(), "seq": book.seq}

    @app.post("/api/datasets/{dataset_id}/labels", tags=["labels"])
    def edit_labels(dataset_id: str, body: LabelsIn, user: dict = Depends(current_user)):
        """One edit through the app's label journal: apply, clear, discard, rename, merge."""
        p = built(dataset_for(user, dataset_id))
        try:
            _, book = label_book(p, f"api-{user['name']}")
            if body.op == "apply":
                if body.label is None:
                    raise ValueError("apply needs \"label\"")
                rec = book.apply(body.keys, body.label)
            elif body.op == "clear":
                rec = book.clear(body.keys)
            elif body.op == "discard":
                rec = book.discard(body.keys)
            elif body.op == "rename":
                if body.old is None or body.new is None:
                    raise ValueError("rename needs \"old\" and \"new\"")
                rec = book.rename(body.old, body.new)
            else:
                if body.old is None or body.new is None:
                    raise ValueError("merge needs \"old\" (a) and \"new\" (b); \"into\" optional")
                rec = book.merge(body.old, body.new, body.into)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None
        except OSError as exc:  # nothing was saved (explorer.journal.JournalError)
            raise ServiceError(503, f"the label edit was not saved: {exc}") from None
        from explorer.journal import change_groups

        changed = 0 if rec is None else sum(len(g[2]) for g in
                                            change_groups(rec["args"].get("changes")))
        return {"changed": changed,
                "counts": book.counts(), "seq": book.seq}

    @app.post("/api/datasets/{dataset_id}/exports", tags=["results"],
              response_class=StreamingResponse,
              responses={200: {"content": {"application/zip": {}}}})
    async def export_zip(dataset_id: str, body: Optional[ExportIn] = None,
                         user: dict = Depends(current_user)):
        """A zip of ``cluster_N/`` (or one folder per label), ``outliers/`` and, with
        ``sample``, ``sample/`` holding that share of every folder; ``manifest.csv`` lists
        every image and ``MISSING.txt`` the rows whose image could not be exported. Streamed
        while it is written (explorer.exports)."""
        from explorer import exports

        ds = dataset_for(user, dataset_id)
        p = built(ds)
        body = body or ExportIn()
        try:
            frac = exports.parse_sample(body.sample)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None
        root = image_folder_of(ds)

        def plan():
            from explorer.table import read_table

            if body.by == "label":
                from explorer.labels import labelled_table

                df, book = label_book(p, f"api-{user['name']}")
                df = labelled_table(df, book)
            else:
                df = read_table(p["csv"])
            return df, exports.plan_export(df, root, layout=body.by, sample=frac)

        try:
            df, plan = await asyncio.to_thread(plan)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None
        except OSError as exc:
            raise ServiceError(503, f"the export cannot be planned now: {exc}") from None
        paths = df["path"].fillna("").astype(str).tolist()
        rows = [{"path": paths[r], "folder": arc.split("/", 1)[0], "file": arc.rsplit("/", 1)[1],
                 "sampled": r in plan.sampled}
                for (arc, _), r in zip(plan.entries, plan.rows)
                if not arc.startswith(exports.SAMPLE + "/")]
        import pandas as pd

        manifest = pd.DataFrame(rows, columns=["path", "folder", "file", "sampled"]).to_csv(
            index=False)
        extra = {exports.MANIFEST: manifest, "MISSING.txt": plan.refused_note()}
        name = f"{ds['id']}-{body.by}.zip"
        return StreamingResponse(
            stream_from(lambda f: exports.write_zip(plan.entries, f, extra=extra)),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'})

    def run_search(p: dict[str, Path], **query) -> dict:
        try:
            from explorer.search import search
        except ImportError:
            raise ServiceError(501, "search is not part of this installation") from None
        try:
            hits = search(p["csv"], progress=False, **query)
        except ValueError as exc:  # SearchError: no features, no concepts, bad query
            raise ServiceError(422, str(exc)) from None
        return {"results": json.loads(json.dumps(hits, default=_plain))}

    @app.post("/api/datasets/{dataset_id}/search", tags=["results"])
    async def search_text(dataset_id: str, body: SearchIn, user: dict = Depends(current_user)):
        """The dataset's images ranked for a query in words (explorer search)."""
        p = built(dataset_for(user, dataset_id))
        return await asyncio.to_thread(run_search, p, text=body.text, top=body.top)

    @app.post("/api/datasets/{dataset_id}/search/image", tags=["results"], openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"},
                "top": {"type": "integer", "minimum": 1, "maximum": 200}}}}}}})
    async def search_image(dataset_id: str, request: Request, user: dict = Depends(current_user)):
        """The dataset's images nearest to an example image (multipart field ``image``)."""
        p = built(dataset_for(user, dataset_id))
        staging = p["dir"] / f"search-{secrets.token_hex(4)}"
        limits = Limits(max_request_bytes=config.limits.max_file_bytes + 65536, max_files=1)
        try:
            fields, files = await receive_multipart(request, staging, limits)
            if not files:
                raise ServiceError(422, "send the example image as the multipart field 'image'")
            top = fields.get("top") or "10"
            if not top.isdigit() or not 1 <= int(top) <= 200:
                raise ServiceError(422, f"top must be 1-200, got {top!r}")
            tmp = files[0][0]
            from explorer.service.uploads import image_format

            try:
                fmt = await asyncio.to_thread(image_format, tmp, config.limits.max_pixels)
            except ValueError as exc:
                raise ServiceError(422, f"the example is not usable: {exc}") from None
            from explorer.service.uploads import FORMATS

            example = tmp.with_name("example" + FORMATS[fmt])
            os.replace(tmp, example)
            return await asyncio.to_thread(run_search, p, image=example, top=int(top))
        except RequestTooLarge as exc:
            raise ServiceError(413, str(exc)) from None
        except ValueError as exc:
            raise ServiceError(400, str(exc)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ the apps
    def app_user(request_or_ws) -> Optional[dict]:
        sid = request_or_ws.cookies.get(COOKIE)
        if sid:
            u = db.user_by_session(sid)
            if u is not None:
                return u
        auth = request_or_ws.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return db.user_by_token(auth[7:].strip())
        return None

    def app_dataset(request_or_ws, ds_id: str) -> Optional[dict]:
        user = app_user(request_or_ws)
        if user is None:
            return None
        try:
            return dataset_for(user, ds_id)
        except ServiceError:
            return None

    def app_not_found(path: str) -> HTMLResponse:
        return HTMLResponse(_page("Not found", "<p>Nothing here, or you need to log in.</p>"
                                  + _login_form(path)), status_code=404)

    @app.get("/login", include_in_schema=False)
    def login_page(next: str = "/"):
        return HTMLResponse(_page("Log in", _login_form(next)))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        try:
            form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
        except Exception:  # noqa: BLE001 - any unreadable form is a bad request
            raise ServiceError(400, "send the form fields token and next") from None
        token, nxt = str(form.get("token") or ""), str(form.get("next") or "/")
        user = db.user_by_token(token)
        if user is None:
            return HTMLResponse(_page("Log in", "<p>Unknown token.</p>" + _login_form(nxt)),
                                status_code=401)
        if not re.match(r"^/apps/[0-9a-f]{1,63}(/[^/\\]*)*$", nxt):
            nxt = "/docs"
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(COOKIE, db.new_session(user["id"]), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=7 * 24 * 3600, path="/")
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request):
        sid = request.cookies.get(COOKIE)
        if sid:
            db.end_session(sid)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/apps/{dataset_id}", include_in_schema=False)
    def app_root(dataset_id: str, request: Request):
        ds = app_dataset(request, dataset_id)
        if ds is None:
            return app_not_found(f"/apps/{dataset_id}")
        return RedirectResponse(f"/apps/{ds['id']}/app", status_code=307)

    @app.api_route("/apps/{dataset_id}/{path:path}", methods=["GET", "HEAD", "POST"],
                   include_in_schema=False)
    async def app_proxy(dataset_id: str, path: str, request: Request):
        if ".." in path.split("/") or "\\" in path:
            return app_not_found(f"/apps/{dataset_id}")
        ds = app_dataset(request, dataset_id)
        if ds is None:
            return app_not_found(f"/apps/{dataset_id}")
        p = paths_of(ds)
        if not p["csv"].is_file() or not (p["app"] / "main.py").is_file():
            return HTMLResponse(_page("Not built yet", "<p>Build this dataset first (POST "
                                      f"/api/datasets/{ds['id']}/builds).</p>"), status_code=409)
        try:
            sock = await apps.ensure(ds["id"], p["app"], p["csv"])
        except AppUnavailable as exc:
            return JSONResponse({"error": f"the app could not start: {exc}"}, status_code=503)
        return await proxy_http(request, sock, request.url.path, COOKIE)

    @app.websocket("/apps/{dataset_id}/{path:path}")
    async def app_ws(websocket: WebSocket, dataset_id: str, path: str):
        ds = app_dataset(websocket, dataset_id)
        origin = websocket.headers.get("origin")
        host = websocket.headers.get("host", "")
        same_origin = origin is None or re.sub(r"^https?://", "", origin) == host
        if ds is None or not same_origin:
            await websocket.close(code=1008)
            return
        p = paths_of(ds)
        try:
            sock = await apps.ensure(ds["id"], p["app"], p["csv"])
        except AppUnavailable:
            await websocket.close(code=1011)
            return
        await proxy_websocket(websocket, sock, websocket.url.path)

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/docs")

    return app


def _plain(o):
    """JSON for numpy scalars and arrays, paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _page(title: str, body: str) -> str:
    import html

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _login_form(next_path: str) -> str:
    import html

    return ("<form method='post' action='/login'><label>API token "
            "<input name='token' type='password' autocomplete='off'></label>"
            f"<input type='hidden' name='next' value='{html.escape(next_path, quote=True)}'>"
            "<button type='submit'>Log in</button></form>")
