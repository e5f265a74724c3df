"""Work done once per Bokeh server process (bokeh's directory-app hooks)."""

import logging
import os
import threading
import time

log = logging.getLogger("bokeh.server.explorer")  # shown in bokeh serve's own log


def _warm_up() -> None:
    # 'Re-cluster selection' runs UMAP + HDBSCAN; the first call in a process compiles
    # numba code for tens of seconds. Do that in the background while the person looks
    # at the map, so their first re-cluster answers in seconds.
    import numpy as np

    from explorer.hierarchy import recluster

    t0 = time.perf_counter()
    X = np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32)
    try:
        recluster(X, "warm-up", seed=0)
    except Exception:  # a failed warm-up only means a slower first re-cluster
        log.exception("re-cluster warm-up failed")
        return
    log.info("re-cluster code compiled in %.0f s (background warm-up)", time.perf_counter() - t0)


def on_server_loaded(server_context) -> None:
    from explorer.app.downloads import install, store

    # saved CSVs and zips are served by our own handler, to the session that saved them only
    install(server_context)
    server_context.add_periodic_callback(store().expire, 60_000)
    if os.environ.get("EXPLORER_NO_WARMUP"):
        return
    threading.Thread(target=_warm_up, name="explorer-warm-up", daemon=True).start()
