"""The service's one error type and the handlers that answer every error as JSON
``{"error": message}`` (a 500 only for a bug)."""

from __future__ import annotations

import traceback
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    """An error the API answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def not_found(what: str = "dataset") -> ServiceError:
    return ServiceError(404, f"{what} not found")


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def _service_error(request, exc: ServiceError):
    return error_response(exc.status, exc.message, **exc.extra)


async def _http_error(request, exc: StarletteHTTPException):
    msg = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404:
        msg = "not found"
    return JSONResponse({"error": msg}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _invalid(request, exc: RequestValidationError):
    details = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        details.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return JSONResponse({"error": "invalid request: " + "; ".join(details[:5])},
                        status_code=422)


async def _bug(request, exc: Exception):  # a bug: say so in JSON, keep serving
    traceback.print_exception(exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)
