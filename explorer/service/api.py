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

from fastapi import FastAPI

from explorer.service.apps import AppServers
from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import user_for_token
from explorer.service.errors import ServiceError, install_error_handlers, not_found
from explorer.service.guard import Guard
from explorer.service.jobs import JobQueue
from explorer.service.policy import UploadSlots

__all__ = ["ServiceConfig", "ServiceError", "create_app", "not_found"]


def create_app(config: ServiceConfig) -> FastAPI:
    """The service's app: its state (records, queue, app processes), error handlers and the
    routers of :mod:`explorer.service.routes`."""
    from explorer.service.routes import ROUTERS

    db = DB(config.data / "service.db")
    queue = JobQueue(db, config.data, concurrency=config.concurrency,
                     max_seconds=config.quotas.job_seconds)
    (config.data / "logs").mkdir(parents=True, exist_ok=True)
    apps = AppServers(config.data, idle=config.app_idle, max_running=config.app_max_running,
                      max_per_user=config.app_max_per_user)

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
    app.state.config = config
    app.state.db = db
    app.state.queue = queue
    app.state.apps = apps
    app.state.uploads = UploadSlots(config.quotas)
    install_error_handlers(app)
    app.add_middleware(Guard, limits=config.limits, allowed_hosts=config.allowed_hosts,
                       authorized=lambda header: user_for_token(db, header) is not None)
    for router in ROUTERS:
        app.include_router(router)
    return app
