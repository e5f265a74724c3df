"""Who is calling: ``/api/me`` (bearer token), and the browser login (``/login``, ``/logout``)
that sets the cookie the ``/apps`` pages use."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from explorer.service.apps import AppServers
from explorer.service.db import DB, token_hash
from explorer.service.deps import COOKIE, current_user, get_apps, get_db
from explorer.service.errors import ServiceError
from explorer.service.pages import login_form, page

api = APIRouter(prefix="/api", tags=["users"])
pages = APIRouter(include_in_schema=False)


@api.get("/me")
def me(user: dict = Depends(current_user)):
    """Who the token belongs to."""
    return {"name": user["name"], "admin": user["admin"], "projects": user["projects"]}


@pages.get("/login")
def login_page(next: str = "/"):
    return HTMLResponse(page("Log in", login_form(next)))


@pages.post("/login")
async def login(request: Request, db: DB = Depends(get_db)):
    try:
        form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
    except Exception:  # noqa: BLE001 - any unreadable form is a bad request
        raise ServiceError(400, "send the form fields token and next") from None
    token, nxt = str(form.get("token") or ""), str(form.get("next") or "/")
    user = db.user_by_token(token)
    if user is None:
        return HTMLResponse(page("Log in", "<p>Unknown token.</p>" + login_form(nxt)),
                            status_code=401)
    if not re.match(r"^/apps/[0-9a-f]{1,63}(/[^/\\]*)*$", nxt):
        nxt = "/docs"
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(COOKIE, db.new_session(user["id"]), httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", max_age=7 * 24 * 3600, path="/")
    return resp


@pages.post("/logout")
def logout(request: Request, db: DB = Depends(get_db), apps: AppServers = Depends(get_apps)):
    sid = request.cookies.get(COOKIE)
    if sid:
        db.end_session(sid)
        apps.live.recheck(session=token_hash(sid))  # its open app sockets close
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp
