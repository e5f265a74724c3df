"""One user cache folder (``XDG_CACHE_HOME``) for the whole test run.

The Find tab's tests need the MiniLM vectors of the 1,000 class names
(:func:`explorer.curation.search.class_vectors`): 8-24 CPU seconds to encode, milliseconds to
read back. Each test process (an xdist worker, a served app) used to encode them again in a
cache folder of its own; in this folder, shared by the run's workers and the servers they
start, the first one keeps them for the others (the file is written atomically). It lies in
the run's temporary folder, never in the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_cache_dir(tmp_path_factory) -> Path:
    """The run's cache folder: beside the xdist workers' own folders (``popen-gwN``), or
    in the base temporary folder of a run without workers."""
    base = Path(tmp_path_factory.getbasetemp())
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "xdg-cache"
    path.mkdir(exist_ok=True)
    return path


def class_vectors_cached(tmp_path_factory) -> Path:
    """Make sure the class-name vectors are in the run's user cache, :func:`shared_cache_dir`
    (``XDG_CACHE_HOME`` of every test and the servers it starts, set by
    ``conftest.run_cache``): the first process of the run to get here encodes them, under a
    lock, and the others wait for it and read them back (two workers reaching the Find tab's
    tests at once used to encode them twice)."""
    import fcntl

    from explorer.curation.search import class_vectors

    cache = shared_cache_dir(tmp_path_factory)
    with open(cache / ".class-vectors.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        class_vectors()
    return cache
