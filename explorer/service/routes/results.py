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
_elbow_lock = threading.Lock()  # one elbow computation at a time (each holds the features)


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
    feats = p["dir"] / "app.features.npy"
    if not feats.is_file():
        raise ServiceError(409, "the build wrote no features (app.features.npy)")
    cache = p["dir"] / "elbow.json"
    key = f"{feats.stat().st_mtime_ns}:{feats.stat().st_size}:{k_max}"

    def compute():
        with _elbow_lock:
            with contextlib.suppress(OSError, ValueError, KeyError):
                c = json.loads(cache.read_text())
                if c["key"] == key:
                    return c["elbow"]
            import numpy as np

            from explorer import cluster as cluster_mod

            X = np.load(feats).astype(np.float32)
            if len(X) > 20_000:
                X = X[np.random.default_rng(0).choice(len(X), 20_000, replace=False)]
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
