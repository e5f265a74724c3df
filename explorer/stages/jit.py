"""Numba kernels of umap-learn (and the pynndescent kernels it calls), compiled once per
machine instead of once per process.

umap-learn marks almost none of its numba kernels ``cache=True`` (1 of about 130) and
pynndescent a part of them, so every process that drew a map or a neighbour graph compiled
them again: every ``explorer build``, every re-cluster in the app, every test worker. On the
2-core machine (docs/testing.md) a fresh process's first UMAP fit of 300 points cost 14.4 CPU s
and 5.7 once its kernels were cached; pynndescent's first graph 60 and 21 (what is left,
``nn_descent`` itself, holds "dynamic globals" numba cannot cache; the build's neighbour
graph now comes from faiss, see :mod:`explorer.stages.knn`).

:func:`cache_kernels` turns numba's on-disk cache on for the module-level kernels of a loaded
library, before their first compile (numba's own ``Dispatcher.enable_caching``, what
``@njit(cache=True)`` calls). The cache sits where numba puts it for ``cache=True`` kernels:
beside the library's sources (``__pycache__``), or numba's per-user cache folder when those
are read-only, or ``NUMBA_CACHE_DIR``; numba checks each entry against the source file's
time stamp. A kernel numba cannot cache is compiled as before (numba's warning about it is
silenced: it is not the user's to act on).
"""

from __future__ import annotations

import sys
import warnings

_done: set[str] = set()


def cache_kernels(*libraries: str) -> int:
    """Turn numba's disk cache on for the not yet cached kernels of each of ``libraries``'
    modules that are loaded (importing none: umap's optional plotting and parametric
    modules stay unloaded). Call it after importing the library and before its first use;
    a later call for the same library does nothing. Returns how many kernels it turned on."""
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
        from numba.core.errors import NumbaWarning
    except ImportError:  # pragma: no cover - numba always comes with umap-learn
        return 0
    turned = 0
    for lib in libraries:
        if lib in _done or lib not in sys.modules:
            continue
        _done.add(lib)
        for name, module in list(sys.modules.items()):
            if module is None or (name != lib and not name.startswith(lib + ".")):
                continue
            for obj in list(vars(module).values()):
                if (isinstance(obj, Dispatcher) and getattr(obj, "py_func", None) is not None
                        and obj.py_func.__module__ == name
                        and isinstance(getattr(obj, "_cache", None), NullCache)
                        and hasattr(obj, "enable_caching")):
                    obj.enable_caching()
                    turned += 1
    if turned:
        warnings.filterwarnings("ignore", message="Cannot cache compiled function",
                                category=NumbaWarning)
    return turned


def warm() -> dict[str, float]:
    """Compile the kernels a build, the app's re-cluster and re-map use into numba's disk
    cache now, on a few hundred made-up points, so no later process waits for them: UMAP
    seeded and parallel, unsupervised and with labels (``y``), :func:`reduce.reduce_map`,
    fast_hdbscan (the clustering backend from 50,000 points) and the near-duplicate search
    (:func:`duplicates.group_hashes`). ``make setup`` runs it once per install (``python -m
    explorer.stages.jit``); in a new install these compiles cost 85-130 CPU seconds of the
    first build or test run on the 2-core machine (docs/testing.md). Returns the seconds
    each part took."""
    import time

    import numpy as np

    from explorer.stages import cluster, duplicates, reduce

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 16))
    X = (centres[np.arange(300) % 3] + rng.normal(size=(300, 16))).astype(np.float32)
    y = np.where(np.arange(300) % 5 == 0, np.arange(300) % 3, -1)
    steps = {
        "map, seeded": lambda: reduce.map_and_space(X, random_state=0),
        "map, parallel": lambda: reduce.map_and_space(X),
        "map with labels": lambda: reduce.map_and_space(X, random_state=0, y=y),
        "reduce_map": lambda: reduce.reduce_map(X, random_state=0),
        "fast_hdbscan": lambda: cluster.cluster(X[:, :5], "hdbscan", backend="fast_hdbscan"),
        "duplicate groups": lambda: duplicates.group_hashes(
            rng.integers(0, 2**63, 300, dtype=np.uint64)),
    }
    took: dict[str, float] = {}
    for name, step in steps.items():
        t = time.perf_counter()
        step()
        took[name] = time.perf_counter() - t
    return took


if __name__ == "__main__":
    for part, seconds in warm().items():
        print(f"compiled {part}: {seconds:.1f} s")
