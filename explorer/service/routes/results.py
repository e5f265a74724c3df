"""A built dataset's results: the table, and the elbow curve for choosing k."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse

from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db, visible_dataset
from explorer.service.errors import ServiceError
from explorer.service.records import built

router = APIRouter(prefix="/api/datasets", tags=["results"])
#: rows of the feature matrix the elbow curve is computed on (a seeded sample)
ELBOW_ROWS = 20_000
_elbow_locks: dict[str, threading.Lock] = {}  # one computation per dataset at a time
_elbow_locks_guard = threading.Lock()
_elbow_slots = threading.BoundedSemaphore(2)  # and at most two in the whole service


def sample_features(path, rows: int = ELBOW_ROWS, seed: int = 0):
    """At most ``rows`` rows of the ``.npy`` feature matrix at ``path``, as float32, in file
    order (a seeded sample when there are more). Only the sampled rows are read (one
    ``pread`` each) and converted, so memory stays ~``rows`` x D x 4 bytes at any N (review
    N15: the whole matrix was converted first, 7 GB at 1M images; a memory map would still
    fault the whole file in through read-ahead)."""
    import os

    import numpy as np

    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise ValueError(f"features must be a C-order 2-d matrix, got shape {shape}")
        n, d = shape
        if n <= rows:
            return np.load(path).astype(np.float32, copy=False)
        idx = np.sort(np.random.default_rng(seed).choice(n, rows, replace=False))
        width = d * dtype.itemsize
        out = np.empty((rows, d), dtype=np.float32)
        fd = fh.fileno()
        for k, i in enumerate(idx.tolist()):
            out[k] = np.frombuffer(os.pread(fd, width, offset + i * width), dtype=dtype)
    return out


def _elbow_lock(ds_id: str) -> threading.Lock:
    with _elbow_locks_guard:
        return _elbow_locks.setdefault(ds_id, threading.Lock())


@router.get("/{dataset_id}/table.csv", response_class=FileResponse)
def table_csv(ds: dict = Depends(visible_dataset), config: ServiceConfig = Depends(get_config)):
    """The table written by the last build (schema: explorer.table)."""
    p = built(config, ds)
    return FileResponse(p["csv"], media_type="text/csv", filename=f"{ds['id']}.csv")


@router.get("/{dataset_id}/elbow")
async def elbow(dataset_id: str, user: dict = Depends(current_user),
                k_max: int = Query(15, ge=2, le=50), config: ServiceConfig = Depends(get_config),
                db: DB = Depends(get_db)):
    """KMeans inertia over k = 1..k_max on the dataset's features, and the k at the elbow."""
    p = built(config, dataset_for(db, user, dataset_id))
    from explorer import dataset

    feats = dataset.open(p["csv"]).features_path
    if not feats.is_file():
        raise ServiceError(409, f"the build wrote no features ({feats.name})")
    cache = p["dir"] / "elbow.json"
    key = f"{feats.stat().st_mtime_ns}:{feats.stat().st_size}:{k_max}"

    def compute():
        with _elbow_lock(p["dir"].name), _elbow_slots:
            with contextlib.suppress(OSError, ValueError, KeyError):
                c = json.loads(cache.read_text())
                if c["key"] == key:
                    return c["elbow"]
            from explorer.stages import cluster as cluster_mod

            X = sample_features(feats)
            res = cluster_mod.cluster(X, "kmeans", k_max=k_max)
            if res.elbow is None:
                out = {"k": [], "inertia": [], "suggested_k": int(res.n_clusters)
                       if hasattr(res, "n_clusters") else 1, "notes": list(res.notes)}
            else:
                out = {"k": [int(k) for k in res.elbow["k"]],
                       "inertia": [float(v) for v in res.elbow["inertia"]],
                       "suggested_k": int(res.elbow["chosen_k"]), "notes": list(res.notes)}
            out["points"] = int(len(X))
            from explorer.table import atomic_write_text

            atomic_write_text(cache, json.dumps({"key": key, "elbow": out}))
            return out

    try:
        return await asyncio.to_thread(compute)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
