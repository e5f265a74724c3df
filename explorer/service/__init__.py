"""``explorer serve``: the explorer as a service for a team.

* :mod:`explorer.service.api`     ``create_app``: the state, the error handlers, the routers
* :mod:`explorer.service.routes`  one ``APIRouter`` per resource (auth, datasets, builds, jobs,
  results, labels, exports, search, apps)
* :mod:`explorer.service.deps`    the routes' dependencies: config, records, queue, the caller,
  the dataset asked for (swappable with ``app.dependency_overrides``)
* :mod:`explorer.service.records` what the service keeps per dataset; folder and project rules
* :mod:`explorer.service.models`  the JSON bodies (``BuildIn`` in ``build_request``)
* :mod:`explorer.service.config`  ``ServiceConfig``; :mod:`explorer.service.errors` JSON errors
* :mod:`explorer.service.db`      users, datasets and jobs in SQLite (tokens stored hashed)
* :mod:`explorer.service.jobs`    the persistent job queue; builds in worker processes
* :mod:`explorer.service.worker`  one build in its own process
* :mod:`explorer.service.uploads` uploads, zips and names from strangers, checked
* :mod:`explorer.service.fetch`   image downloads from URLs, with the address rules
* :mod:`explorer.service.apps`    each dataset's Bokeh app behind the service's login

Importing this package imports nothing heavy; FastAPI is imported by :func:`create_app`.
"""

from __future__ import annotations

from typing import Any


def create_app(config: Any):
    """The service's ASGI app for a :class:`explorer.service.api.ServiceConfig`."""
    from explorer.service.api import create_app as _create

    return _create(config)


def serve(root, data, *, host: str = "127.0.0.1", port: int = 8000, concurrency: int = 1,
          allow_private_urls: bool = False, url_timeout: float = 10.0, log_level: str = "info",
          **limits: Any) -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    from explorer.service.api import ServiceConfig
    from explorer.service.uploads import Limits

    cfg = ServiceConfig(root=root, data=data, concurrency=concurrency,
                        allow_private_urls=allow_private_urls, url_timeout=url_timeout,
                        limits=Limits(**limits))
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=10)
