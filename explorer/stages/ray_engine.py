"""``explorer build --engine ray``: decoding and embedding as a Ray Data pipeline.

The driver (the machine that runs ``explorer build``) lists the files that need work and
writes every result into its store, exactly as the local engine does; Ray does the rest:

1. ``ray.data.from_items`` - one row per file (index, path, known content hash);
2. ``map_batches(decode)`` in Ray tasks - read, hash, decode, thumbnail, phash, quality
   statistics and preprocess (:class:`explorer.stages.engines.decode.Decoder`), giving fixed-size uint8
   pixel arrays;
3. ``map_batches(Embedder)`` on an actor pool - each actor loads the model once and runs
   the forward pass (one GPU per actor where the cluster has GPUs, else CPU actors);
4. ``iter_batches`` back to the driver - vectors and decode facts into the store.

Without ``address`` a local Ray is started (and stopped afterwards); with ``address``
(e.g. ``ray://head:10001`` or ``auto``) the running cluster is used. Every node must see
the image folder and the app's thumbnail folder at the same paths (a shared filesystem),
and have this package and its dependencies installed. Map and clustering then run on the
driver as usual.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

#: rows per decode task batch
DECODE_BATCH = 32


def model_shape(name: str, checkpoint) -> tuple[int, dict, dict[str, Any]]:
    """(embedding dim, timm data config, model info) without loading weights (driver side)."""
    import timm

    from explorer.stages.models import model_info

    m = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=m)
    return int(m.num_features), cfg, model_info(name, checkpoint, cfg, dim=int(m.num_features))


class _DecodeFn:
    """Ray task body: a batch of rows -> decoded, preprocessed columns."""

    def __init__(self, decoder, n_stats: int, hw: tuple[int, int]):
        self.decoder, self.n_stats, self.hw = decoder, n_stats, hw

    def __call__(self, batch: dict) -> dict:
        items = [self.decoder((int(i), p, (h or None)))
                 for i, p, h in zip(batch["i"], batch["path"], batch["known"])]
        n = len(items)
        px = np.zeros((n, *self.hw, 3), np.uint8)
        has_px = np.zeros(n, bool)
        stats = np.full((n, self.n_stats), np.nan, np.float32)
        for k, it in enumerate(items):
            if it.pixels is not None:
                px[k], has_px[k] = it.pixels, True
            if it.stats is not None:
                stats[k] = it.stats
        return {
            "i": np.array([it.index for it in items], np.int64),
            "hash": np.array([it.hash or "" for it in items], dtype=object),
            "width": np.array([(it.size or (0, 0))[0] for it in items], np.int64),
            "height": np.array([(it.size or (0, 0))[1] for it in items], np.int64),
            "phash": np.array([it.phash or 0 for it in items], np.uint64),
            "stats": stats,
            "error": np.array([it.error or "" for it in items], dtype=object),
            "decoded": np.array([it.decoded for it in items], bool),
            "has_vector": np.array([it.has_vector for it in items], bool),
            "has_pixels": has_px,
            "pixels": px,
        }


class Embedder:
    """Ray actor: loads the model once, embeds the rows that carry pixels."""

    def __init__(self, name, checkpoint, batch_size, jit, precision):
        import torch

        from explorer.stages.models import open_runner, resolve_device

        device = resolve_device("auto")
        if device == "cpu":
            torch.set_num_threads(1)
        # the same loader as the local engines (and search by image)
        self.runner, self.prep, info = open_runner(name, checkpoint, batch_size=batch_size,
                                                   graph=bool(jit), precision=precision,
                                                   device=device)
        self.dim = int(info["embedding_dim"])

    def __call__(self, batch: dict) -> dict:
        import torch

        has = batch["has_pixels"]
        vec = np.zeros((len(has), self.dim), np.float32)
        t0 = time.perf_counter()
        idx = np.flatnonzero(has)
        for a in range(0, len(idx), self.runner.batch_size):
            part = idx[a:a + self.runner.batch_size]
            u8 = torch.from_numpy(np.ascontiguousarray(batch["pixels"][part]))
            vec[part] = self.runner.embed_uint8(u8, self.prep)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vec
        out["forward_s"] = np.full(len(has), (time.perf_counter() - t0) / max(1, len(has)))
        return out


def run(tasks, decoder, *, name, checkpoint, batch_size, jit, precision, address=None,
        timings=None, num_cpus: int | None = None):
    """Yield ``(items, vectors)`` like the local engines, computed by a Ray Data pipeline."""
    import ray

    from explorer.stages.engines.decode import Item

    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kw["num_cpus"] = num_cpus or os.cpu_count()
        ray.init(address=address, **kw)
        started = True
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        actors = gpus if gpus else max(1, cpus // 2)
        prep = decoder.prep
        ds = ray.data.from_items([{"i": i, "path": str(p), "known": h or ""}
                                  for i, p, h in tasks])
        hw = (prep.height, prep.width) if prep is not None else (1, 1)
        ds = ds.map_batches(_DecodeFn(decoder, decoder.n_stats, hw),
                            batch_size=DECODE_BATCH, batch_format="numpy")
        ds = ds.map_batches(Embedder, fn_constructor_kwargs={
            "name": name, "checkpoint": checkpoint, "batch_size": batch_size, "jit": jit,
            "precision": precision}, batch_size=batch_size, batch_format="numpy",
            concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
        for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            items, vecs = [], []
            for k in range(len(b["i"])):
                it = Item(int(b["i"][k]), hash=b["hash"][k] or None,
                          has_vector=bool(b["has_vector"][k]), decoded=bool(b["decoded"][k]),
                          error=b["error"][k] or None)
                if it.decoded:
                    it.size = (int(b["width"][k]), int(b["height"][k]))
                    it.phash = int(b["phash"][k])
                    it.stats = np.asarray(b["stats"][k], np.float32)
                if b["has_pixels"][k] and it.error is None:
                    it.pixels = np.empty(0, np.uint8)  # vector made now
                    vecs.append(b["vector"][k])
                items.append(it)
            if timings is not None:
                timings["forward"] = timings.get("forward", 0.0) + float(b["forward_s"].sum())
            yield items, (np.stack(vecs) if vecs else None)
    finally:
        if started:
            ray.shutdown()
