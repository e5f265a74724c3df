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


def hosts_for(host: str, port: int, extra=()) -> tuple[str, ...]:
    """The ``Host`` patterns a service listening on ``host:port`` answers besides loopback
    names: the address itself (unless it is a wildcard such as 0.0.0.0) and ``extra``."""
    out = []
    if host not in ("0.0.0.0", "::", ""):
        name = f"[{host}]" if ":" in host and not host.startswith("[") else host
        out.append(f"{name}:{port}")
    for h in extra:
        h = str(h).strip()
        if not h:
            raise ValueError(f"allowed host must be a host name, got {h!r}")
        out.append(h)
    return tuple(out)


def serve(root, data, *, host: str = "127.0.0.1", port: int = 8000, concurrency: int = 1,
          allow_private_urls: bool = False, url_timeout: float = 10.0, log_level: str = "info",
          header_timeout: float = 10.0, max_connections: int = 1000, app_max_running: int = 8,
          app_max_per_user: int = 3, quotas: dict[str, Any] | None = None,
          allowed_hosts: tuple[str, ...] = (), **limits: Any) -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C or SIGTERM).

    ``header_timeout``: seconds a connection has to send a request's head before it is
    closed; ``max_connections``: open connections (and requests) at most, answered 503
    beyond (explorer.service.sockets; the descriptor limit is raised to fit);
    ``app_max_running``/``app_max_per_user``: dataset app processes at once, and per user;
    ``quotas``: fields of :class:`explorer.service.policy.Quotas` (per-user limits, the build
    time limit); ``allowed_hosts``: ``Host`` values served besides loopback names (the
    public name behind a proxy; the address listened on, when it is not a wildcard, is added).
    """
    import logging

    import uvicorn

    from explorer.service.api import ServiceConfig
    from explorer.service.policy import Quotas
    from explorer.service.sockets import RateLimitedLog, header_timeout_protocol, raise_fd_limit
    from explorer.service.uploads import Limits

    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
    cfg = ServiceConfig(root=root, data=data, concurrency=concurrency,
                        allow_private_urls=allow_private_urls, url_timeout=url_timeout,
                        app_max_running=app_max_running, app_max_per_user=app_max_per_user,
                        limits=Limits(**limits), quotas=Quotas(**(quotas or {})),
                        allowed_hosts=hosts_for(host, port, allowed_hosts))
    fds = raise_fd_limit()
    if fds:  # keep room for the database, logs, app sockets and workers
        max_connections = max(1, min(max_connections, fds - 64))
    config = uvicorn.Config(create_app(cfg), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, limit_concurrency=max_connections,
                            timeout_keep_alive=5, http=header_timeout_protocol(header_timeout))
    quiet = RateLimitedLog()
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(quiet)
    uvicorn.Server(config).run()
