"""The API's dependencies: the service's state (config, records, queue, app processes), the
caller, and the dataset the caller asks for.

Each is a FastAPI dependency reading ``app.state`` (set by :func:`explorer.service.api.create_app`),
so a test can swap any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from explorer.service.apps import AppServers
from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.errors import ServiceError, not_found
from explorer.service.jobs import JobQueue

bearer = HTTPBearer(auto_error=False)
COOKIE = "explorer_session"


def get_config(conn: HTTPConnection) -> ServiceConfig:
    return conn.app.state.config


def get_db(conn: HTTPConnection) -> DB:
    return conn.app.state.db


def get_queue(conn: HTTPConnection) -> JobQueue:
    return conn.app.state.queue


def get_apps(conn: HTTPConnection) -> AppServers:
    return conn.app.state.apps


def user_for_token(db: DB, authorization: Optional[str]) -> Optional[dict]:
    """The user an ``Authorization: Bearer TOKEN`` header value names, or None."""
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
        if token:
            return db.user_by_token(token)
    return None


def current_user(cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
                 db: DB = Depends(get_db)) -> dict:
    """The caller of an ``/api`` route (bearer token only); 401 otherwise."""
    if cred is None or cred.scheme.lower() != "bearer":
        raise ServiceError(401, "send Authorization: Bearer TOKEN (explorer users add)")
    user = db.user_by_token(cred.credentials)
    if user is None:
        raise ServiceError(401, "unknown or revoked token")
    return user


def app_user(conn: HTTPConnection, db: DB = Depends(get_db)) -> Optional[dict]:
    """The caller of an ``/apps`` page or websocket: the login cookie, else a bearer token."""
    sid = conn.cookies.get(COOKIE)
    if sid:
        u = db.user_by_session(sid)
        if u is not None:
            return u
    return user_for_token(db, conn.headers.get("authorization"))


def can_see(user: dict, ds: dict) -> bool:
    return (user["admin"] or ds["owner_id"] == user["id"]
            or (ds["visibility"] == "project" and ds["project"] in user["projects"]))


def dataset_for(db: DB, user: dict, ds_id: str, *, change: bool = False) -> dict:
    """The dataset record ``ds_id`` if ``user`` may see it (and change it, with ``change``):
    404 when not visible (the same answer as for a missing one), 403 when visible only."""
    ds = db.one("SELECT d.*, u.name AS owner FROM datasets d JOIN users u "
                "ON u.id = d.owner_id WHERE d.id = ?", (ds_id,)) if len(ds_id) < 64 else None
    if ds is None or not can_see(user, ds):
        raise not_found()
    if change and not (user["admin"] or ds["owner_id"] == user["id"]):
        raise ServiceError(403, "only the dataset's owner (or an admin) may change it")
    return ds


def visible_dataset(dataset_id: str, user: dict = Depends(current_user),
                    db: DB = Depends(get_db)) -> dict:
    """The path's dataset, for a caller who may see it."""
    return dataset_for(db, user, dataset_id)


def owned_dataset(dataset_id: str, user: dict = Depends(current_user),
                  db: DB = Depends(get_db)) -> dict:
    """The path's dataset, for a caller who may change it."""
    return dataset_for(db, user, dataset_id, change=True)
