"""Each dataset's explorer app at ``/apps/{id}`` (login cookie or bearer token), proxied to
its own ``bokeh serve`` process (explorer.service.apps)."""

from __future__ import annotations

import asyncio
import re
from typing import Optional

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from explorer.service.apps import (AppServers, AppsBusy, AppUnavailable, proxy_http,
                                   proxy_websocket)
from explorer.service.config import ServiceConfig
from explorer.service.db import DB, token_hash
from explorer.service.deps import (COOKIE, app_user, dataset_for, get_apps, get_config,
                                   get_db)
from explorer.service.errors import ServiceError
from explorer.service.pages import app_not_found, page
from explorer.service.records import paths_of

router = APIRouter(include_in_schema=False)


def _app_dataset(db: DB, user: Optional[dict], ds_id: str) -> Optional[dict]:
    if user is None:
        return None
    try:
        return dataset_for(db, user, ds_id)
    except ServiceError:
        return None


@router.get("/apps/{dataset_id}")
def app_root(dataset_id: str, user: Optional[dict] = Depends(app_user),
             db: DB = Depends(get_db)):
    ds = _app_dataset(db, user, dataset_id)
    if ds is None:
        return app_not_found(f"/apps/{dataset_id}")
    return RedirectResponse(f"/apps/{ds['id']}/app", status_code=307)


@router.api_route("/apps/{dataset_id}/{path:path}", methods=["GET", "HEAD", "POST"])
async def app_proxy(dataset_id: str, path: str, request: Request,
                    user: Optional[dict] = Depends(app_user), db: DB = Depends(get_db),
                    config: ServiceConfig = Depends(get_config),
                    apps: AppServers = Depends(get_apps)):
    if ".." in path.split("/") or "\\" in path:
        return app_not_found(f"/apps/{dataset_id}")
    ds = _app_dataset(db, user, dataset_id)
    if ds is None:
        return app_not_found(f"/apps/{dataset_id}")
    p = paths_of(config, ds)
    if not p["csv"].is_file() or not (p["app"] / "main.py").is_file():
        return HTMLResponse(page("Not built yet", "<p>Build this dataset first (POST "
                                 f"/api/datasets/{ds['id']}/builds).</p>"), status_code=409)
    try:
        sock = await apps.ensure(ds["id"], p["app"], p["csv"], user["id"])
    except AppsBusy as exc:
        return JSONResponse({"error": str(exc)}, status_code=503,
                            headers={"Retry-After": "60"})
    except AppUnavailable as exc:
        return JSONResponse({"error": f"the app could not start: {exc}"}, status_code=503)
    return await proxy_http(request, sock, request.url.path, COOKIE)


@router.websocket("/apps/{dataset_id}/{path:path}")
async def app_ws(websocket: WebSocket, dataset_id: str, path: str,
                 user: Optional[dict] = Depends(app_user), db: DB = Depends(get_db),
                 config: ServiceConfig = Depends(get_config),
                 apps: AppServers = Depends(get_apps)):
    ds = _app_dataset(db, user, dataset_id)
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host", "")
    same_origin = origin is None or re.sub(r"^https?://", "", origin) == host
    if ds is None or not same_origin:
        await websocket.close(code=1008)
        return
    p = paths_of(config, ds)
    try:
        sock = await apps.ensure(ds["id"], p["app"], p["csv"], user["id"])
    except AppUnavailable:
        await websocket.close(code=1011)
        return

    def still_allowed() -> bool:  # the same rules as at connect, asked again
        return _app_dataset(db, app_user(websocket, db), dataset_id) is not None

    async def allowed() -> bool:
        return await asyncio.to_thread(still_allowed)

    sid = websocket.cookies.get(COOKIE)
    key, check = apps.live.add(user["id"], token_hash(sid) if sid else None, ds["id"])
    try:
        await proxy_websocket(websocket, sock, websocket.url.path, allowed=allowed,
                              check=check, every=config.app_recheck)
    finally:
        apps.live.remove(key)


@router.get("/")
def index():
    return RedirectResponse("/docs")
