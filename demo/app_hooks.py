"""Work done once per Bokeh server process (bokeh's directory-app hooks)."""

import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("bokeh.server.explorer")  # shown in bokeh serve's own log
#: bokeh runs this file with the app's ``--args`` as sys.argv (as it runs main.py)
_ARGV = list(sys.argv[1:])
_APP_DIR = Path(__file__).resolve().parent


def preload() -> None:
    """Read the project (CSV, embeddings map, ...) at server start instead of at the first
    visit, so the first page of a big project does not wait for it."""
    from explorer.app import find_csv
    from explorer.app.project import load_project

    t0 = time.perf_counter()
    try:
        project = load_project(find_csv(_ARGV, _APP_DIR), _APP_DIR, _APP_DIR.name)
    except Exception as exc:  # the first session shows the reason on its page
        log.warning("explorer: project not preloaded (%s)", exc)
        return
    log.info("explorer: %s rows loaded in %.1f s", f"{project.n_rows:,}", time.perf_counter() - t0)


def warm_up():
    """Compile the re-cluster code in the worker process that runs re-clusters.

    'Re-cluster selection' runs UMAP + HDBSCAN in :func:`explorer.app.work.processes`; the
    first call in that process compiles numba code for tens of seconds. Do it while the
    person looks at the map, so their first re-cluster answers in seconds. Returns the
    future (its result: seconds taken, or the exception)."""
    import numpy as np

    from explorer.app import work

    t0 = time.perf_counter()
    X = np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32)
    future = work.processes().submit(work.recluster_in_worker, X, "warm-up", 0)

    def done(fut):
        exc = fut.exception()
        if exc is not None:  # a failed warm-up only means a slower first re-cluster
            log.error("re-cluster warm-up failed: %s", exc)
        else:
            log.info("re-cluster code compiled in %.0f s (worker process)", time.perf_counter() - t0)

    future.add_done_callback(done)
    return future


def on_server_loaded(server_context) -> None:
    from bokeh.settings import settings

    from explorer.app.downloads import install, store
    from explorer.app.serving import protect

    # Bokeh checks every new session's ~250 models for layout warnings (0.1-0.2 s a session on a
    # 2-core machine); the page is the same each time, and the tests validate it. EXPLORER_VALIDATE_DOC=1 keeps it.
    if os.environ.get("EXPLORER_VALIDATE_DOC", "") not in ("1", "true", "yes"):
        settings.perform_document_validation.set_value(False)
    # DNS rebinding: any Host but this computer's names (and --allow-websocket-origin) gets 403
    protect(server_context)
    # saved CSVs and zips are served by our own handler, to the session that saved them only;
    # thumbnails by row number from /<app>/_thumb/<row>
    install(server_context)
    # expired exports are deleted even if nobody asks for them again (bokeh's server context
    # has no periodic callbacks of its own: a Tornado one on the server's loop)
    from tornado.ioloop import PeriodicCallback

    PeriodicCallback(store().expire, store().sweep_seconds * 1000).start()
    threading.Thread(target=preload, name="explorer-preload", daemon=True).start()
    if not os.environ.get("EXPLORER_NO_WARMUP"):
        warm_up()


def on_server_unloaded(server_context) -> None:
    """The server is stopping (Ctrl-C, SIGTERM): delete the private export folder."""
    from explorer.app.downloads import store

    store().close()
