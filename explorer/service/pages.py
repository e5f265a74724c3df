"""The few HTML pages of the service (login, not found), escaped."""

from __future__ import annotations

import html

from fastapi.responses import HTMLResponse


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def login_form(next_path: str) -> str:
    return ("<form method='post' action='/login'><label>API token "
            "<input name='token' type='password' autocomplete='off'></label>"
            f"<input type='hidden' name='next' value='{html.escape(next_path, quote=True)}'>"
            "<button type='submit'>Log in</button></form>")


def app_not_found(path: str) -> HTMLResponse:
    return HTMLResponse(page("Not found", "<p>Nothing here, or you need to log in.</p>"
                             + login_form(path)), status_code=404)
