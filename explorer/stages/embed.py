"""The embedding stage: image files -> vectors (+ size, phash, quality stats), via the store.

:func:`embed_paths` reads each file at most once (hashing it while streaming), decodes it
at most once (JPEG DCT scaling), hands out its thumbnail, and embeds what the store
(:mod:`explorer.stages.store`) does not already hold. A re-run with a warm store reads and decodes
nothing it has seen: unchanged files (same size and mtime) are known by their path, and the
store keeps their vector, original size, phash and quality statistics.

Engines (how the work runs; the choice is made by the caller, the pipeline):

* CPU (``device="cpu"``): worker threads, one per usable core, each decoding a chunk and
  running the model with one torch thread (no oversubscription), the model traced and
  frozen (``jit``), channels_last, or onnxruntime (the default, float32).
* CUDA / MPS: a torch ``DataLoader`` whose worker processes read, decode, make thumbnails
  and preprocess, feeding pinned uint8 batches; the device normalises them and runs large
  batches in bfloat16, channels_last.
* Ray (``engine="ray"``): :mod:`explorer.stages.ray_engine`, a Ray Data pipeline.

Models, weights, preprocessing and the runner live in :mod:`explorer.stages.models` (re-exported
here for older callers).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from explorer._checks import check_int
from explorer.inputs.archives import Member
from explorer.stages.images import stat_item
from explorer.stages.engines.decode import Decoder, Item  # noqa: F401 - re-exported
from explorer.stages.models import (  # noqa: F401 - re-exported
    ALIASES,
    BUNDLED,
    DEFAULT_MODEL,
    JIT_MIN_IMAGES,
    PREPROCESS_VERSION,
    ModelWeightsError,
    OnnxRunner,
    Preprocessor,
    Runner,
    _Runner,
    _check_weights,
    _is_default,
    _resolve_name,
    onnx_available,
    bundled_weights_path,
    cpu_runs_bf16,
    embed_images,
    file_digest,
    load_model,
    model_info,
    model_key,
    open_runner,
    plain_config,
    resolve_device,
    resolve_precision,
)
from explorer.progress import Bar
from explorer.stages.store import Store

#: default forward batch per device kind
DEFAULT_BATCH = {"cpu": 8, "cuda": 256, "mps": 64}


# --------------------------------------------------------------------------- results
@dataclass
class EmbedResult:
    """What :func:`embed_paths` returns. Arrays cover the ``ok`` images, in input order."""

    # float32 (n_ok, D); (0, 0) when no image could be used; None with vectors=False
    # (they are in the store: rows(model_info["model_key"], hashes))
    embeddings: np.ndarray | None
    ok: np.ndarray  # int indices into the input paths
    width: np.ndarray  # original width (after EXIF rotation)
    height: np.ndarray
    hashes: list[str]  # content hash (blake2b-128 hex) per ok image
    errors: list[tuple[str, str]]  # (path, reason) for skipped files
    n_cached: int = 0  # vectors that came from the store
    phash: np.ndarray | None = None  # uint64 per ok image (64-bit phash of the thumbnail)
    stats: np.ndarray | None = None  # float32 (n_ok, len(quality.STAT_NAMES))
    n_read: int = 0  # files read in this run
    n_decoded: int = 0  # images decoded in this run
    # seconds: model_load, total (wall clock); decode, forward (summed over workers)
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embedded(self) -> int:
        return len(self.ok) - self.n_cached


def _default_workers() -> int:
    """Every usable core (no cap: the old cap of 8 is gone)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- embed_paths
def embed_paths(
    paths: Sequence[str | os.PathLike],
    *,
    model: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int | None = None,
    store: Store | str | os.PathLike | None = None,
    thumb_size: int = 256,
    sink=None,
    progress: bool = True,
    workers: int | None = None,
    threads: int = 1,
    jit: bool | str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    loader: bool | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    chunk_size: int | None = None,
    max_file_mb: float | None = None,
    vectors: bool = True,
    gpu_decode: bool = False,
    runtime: str = "auto",
) -> EmbedResult:
    """Embed image files through the store: one read and at most one decode per file.

    For each path: ``os.stat`` it (files over ``max_file_mb`` are refused unread, M8); if the
    store knows the path unchanged (size, mtime) and holds its vector and decode facts and
    no thumbnail is wanted, nothing else happens. Otherwise read it (hashing while
    streaming), and decode it once only when something is missing: the thumbnail, the
    phash + quality statistics, or the vector. Bad files (empty, not an image, truncated,
    too large, unreadable) are listed in ``errors`` and skipped; they never stop the run.
    Exceptions raised by ``sink`` (e.g. a full disk) do stop it.

    ``sink``: an object with ``need(i, content_hash) -> bool`` and
    ``__call__(i, content_hash, thumb)``; called from worker threads or processes (must be
    picklable for ``engine="ray"`` or a process ``loader``); thumbnails are RGB with the
    longer side <= ``thumb_size``.

    ``store``: a :class:`~explorer.stages.store.Store` or a folder; ``None`` keeps nothing.

    ``device``: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``. ``loader``: decode in a
    torch DataLoader's worker processes (default: on CUDA/MPS) instead of threads.
    ``engine``: ``"local"`` or ``"ray"`` (Ray Data; ``ray_address`` of a running cluster,
    default a local Ray). ``batch_size``: images per forward pass (default 8 on CPU, 256 on
    CUDA). ``workers``: decode workers (default: every usable core). ``threads``: torch
    threads per forward pass on CPU (1: one busy thread per core). ``jit``: trace + freeze
    (``"auto"``: when the store already holds traced vectors or >= ``JIT_MIN_IMAGES`` need
    the model). ``precision``: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (float32 on every
    CPU, bf16 on CUDA GPUs that have it: :func:`~explorer.stages.models.resolve_precision`). The
    store keys vectors by what was actually used.

    Memory: one (N, D) float32 output is allocated and filled in place; cached vectors
    are read from the store's memory-mapped file row by row range, nothing else is kept.
    ``vectors=False`` (needs a ``store``) allocates no output at all: the vectors are only
    written to the store and ``embeddings`` is ``None`` (the build's embedding process,
    whose parent reads the rows it needs from the store).

    ``gpu_decode`` (the ``loader`` engine only; off by default because it has not been
    measured faster here): JPEGs that need a vector are not decoded by the workers but
    handed over as bytes and decoded in batches by ``torchvision.io.decode_jpeg`` on the
    model's device (nvjpeg on CUDA), resized there (:func:`decode_jpeg_batch`); other
    files, and JPEGs it cannot decode, take the CPU path. Ignored by the CPU threads
    engine; ``model_info["gpu_decode"]`` says whether it was used.

    ``runtime``: what runs the forward pass of the CPU threads engine. ``"onnx"``: the model
    exported to onnxruntime (:class:`~explorer.stages.models.OnnxRunner`, float32); ``"torch"``:
    torch, eager or traced as ``jit`` says; ``"auto"`` (default): the kind the store already
    holds most of these images' vectors under, else onnxruntime where it is installed, the
    precision is float32 and ``jit`` is ``"auto"``, else torch. A model that does not export
    falls back to torch (the store keys the vectors by what was used).
    """
    t_start = time.perf_counter()
    device = resolve_device(device)
    kind = device.split(":")[0]
    precision = resolve_precision(precision, device)
    if batch_size is None:
        batch_size = DEFAULT_BATCH[kind]
    batch_size = check_int("batch_size", batch_size, 1)
    thumb_size = check_int("thumb_size", thumb_size, 1)
    threads = check_int("threads", threads, 1)
    workers = check_int("workers", _default_workers() if workers is None else workers, 1)
    chunk_size = check_int("chunk_size", 4 * batch_size if chunk_size is None else chunk_size, 1)
    if jit not in (True, False, "auto"):
        raise ValueError(f"jit must be True, False or 'auto', got {jit!r}")
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"runtime must be 'auto', 'torch' or 'onnx', got {runtime!r}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if max_file_mb is not None and not (isinstance(max_file_mb, (int, float)) and max_file_mb > 0):
        raise ValueError(f"max_file_mb must be a positive number, got {max_file_mb!r}")
    if loader is None:
        loader = kind != "cpu"
    onnx_ok = kind == "cpu" and not loader and engine == "local" and precision == "float32"
    if runtime == "onnx":
        if not onnx_ok:
            raise ValueError("runtime 'onnx' runs only the CPU threads engine in float32 "
                             f"(device {device!r}, engine {engine!r}, precision {precision!r})")
        if not onnx_available():
            raise ValueError("runtime 'onnx' needs onnxruntime and onnx: "
                             "pip install onnxruntime onnx")
    graphs: tuple = (False, True)
    if runtime == "onnx" or (runtime == "auto" and jit == "auto" and onnx_ok
                             and onnx_available()):
        graphs = (False, True, "onnx")
    gpu_decode = bool(gpu_decode and loader)  # the CPU threads engine decodes with PIL
    if not vectors and store is None:
        raise ValueError("vectors=False keeps the vectors only in the store: give a store")
    max_bytes = None if max_file_mb is None else int(max_file_mb * 2**20)
    name = _resolve_name(model)
    _check_weights(name, checkpoint)  # fail fast, before any file is read
    from explorer.stages.quality import STAT_NAMES

    n_stats = len(STAT_NAMES)
    own_store = store is not None and not isinstance(store, Store)
    if own_store:
        store = Store(store)
    try:
        return _embed(paths, name=name, checkpoint=checkpoint, batch_size=batch_size,
                      store=store, thumb_size=thumb_size, sink=sink, progress=progress,
                      workers=workers, threads=threads, jit=jit, precision=precision,
                      device=device, loader=loader, engine=engine, ray_address=ray_address,
                      chunk_size=chunk_size, max_bytes=max_bytes, n_stats=n_stats,
                      t_start=t_start, keep=bool(vectors), gpu_decode=bool(gpu_decode),
                      graphs=graphs, runtime=runtime)
    finally:
        if own_store:
            store.close()


def as_built(run: dict) -> dict[str, Any]:
    """The :func:`embed_paths` keyword arguments that make vectors the way the build whose run
    record is ``run`` made them: its model and checkpoint, and the precision and graph (eager,
    traced or onnxruntime) of its model key, on the CPU, without a store. Records written
    before the key existed fall back to their ``precision``/``runtime``/``jit`` entries
    (float32 eager when they say nothing)."""
    mi = run.get("model") or {}
    params = run.get("parameters") or {}
    name = mi.get("name") or params.get("model") or DEFAULT_MODEL
    key = mi.get("model_key")
    parts = key.split("|") if isinstance(key, str) else []
    if len(parts) == 5:
        precision, graph = parts[2], parts[3]
    else:
        precision = mi.get("precision") or (run.get("execution") or {}).get("precision")
        precision = precision or "float32"
        graph = ("onnx" if mi.get("runtime") == "onnxruntime" else
                 "jit" if mi.get("jit") is True else "eager")
    if precision not in ("float32", "bfloat16") or graph not in ("eager", "jit", "onnx"):
        raise ValueError(f"the run record's model key {key!r} names no precision and graph "
                         "this version knows")
    batch = mi.get("batch_size")
    batch = min(batch, DEFAULT_BATCH["cpu"]) if isinstance(batch, int) and batch > 0 else None
    return {"model": name, "checkpoint": params.get("checkpoint"), "precision": precision,
            "runtime": "onnx" if graph == "onnx" else "torch", "jit": graph == "jit",
            "device": "cpu", "batch_size": batch, "store": None, "engine": "local"}


def embed_as_built(paths: Sequence[str | os.PathLike], run: dict, **kw) -> EmbedResult:
    """Embed files through the build's own path (:func:`embed_paths` with :func:`as_built`):
    search by image, "more like this" from a file and the service use it, so an image of the
    build finds its own row at cosine ~1 whatever precision the build ran in. Raises
    ``ValueError`` when this machine's model key differs from the recorded one (the weights
    or the preprocessing changed since the build: rebuild)."""
    res = embed_paths(paths, **{"progress": False, "workers": 1, **as_built(run), **kw})
    recorded = (run.get("model") or {}).get("model_key")
    if recorded and res.model_info.get("model_key") != recorded:
        raise ValueError(f"the build's vectors are {recorded!r} but this machine makes "
                         f"{res.model_info.get('model_key')!r} (weights or preprocessing "
                         "changed since the build): rebuild to search by image")
    return res


class _NoStore:
    """Stands in for a store when none is given (keeps nothing)."""

    folder = None

    def model_id(self, key, create=True):
        return 0

    def alias(self, requested, actual):
        return 0

    def dim(self, model):
        return None

    def rows(self, model, hashes):
        return np.full(len(hashes), -1, np.int64)

    def image_facts(self, hashes, n_stats, thumb=None):
        from explorer.stages.store import ImageFacts

        n = len(hashes)
        return ImageFacts(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64),
                          np.zeros(n, np.uint64), np.zeros(n, bool),
                          np.full((n, n_stats), np.nan, np.float32), np.zeros(n, bool))

    def known_hashes(self, paths, sizes, mtimes):
        return [None] * len(paths)

    def put(self, *a, **k):
        pass

    def put_images(self, *a, **k):
        pass

    def put_files(self, *a, **k):
        pass

    def read(self, *a, **k):  # pragma: no cover - never called without rows
        raise AssertionError

    def transaction(self):
        import contextlib

        return contextlib.nullcontext()


def _embed(paths, *, name, checkpoint, batch_size, store, thumb_size, sink, progress, workers,
           threads, jit, precision, device, loader, engine, ray_address, chunk_size,
           max_bytes, n_stats, t_start, keep=True, gpu_decode=False, graphs=(False, True),
           runtime="auto") -> EmbedResult:
    paths = [p if isinstance(p, Member) else Path(p) for p in paths]  # archive members stay
    n = len(paths)
    st: Store | _NoStore = store if store is not None else _NoStore()
    timings: dict[str, float] = {"model_load": 0.0, "decode": 0.0, "forward": 0.0}
    errors: dict[int, str] = {}

    # --- 1. stat every file (refuse the too large ones unread), known hashes by path
    sizes = np.zeros(n, np.int64)
    mtimes = np.zeros(n, np.int64)
    for i, p in enumerate(paths):
        try:
            size, mtime = stat_item(p)
        except FileNotFoundError:
            errors[i] = "file not found"
            continue
        except OSError as exc:
            errors[i] = f"cannot read ({exc.strerror or exc})"
            continue
        sizes[i], mtimes[i] = size, mtime
        if max_bytes is not None and size > max_bytes:
            from explorer.stages.images import _too_large

            errors[i] = _too_large(size, max_bytes)
    live = [i for i in range(n) if i not in errors]
    known: list[str | None] = [None] * n
    for i, h in zip(live, st.known_hashes([paths[i] for i in live], sizes[live], mtimes[live])):
        known[i] = h

    # --- 2. the model key: graph (eager / jit / onnx) and precision as they will be used
    keys = {g: model_key(name, checkpoint, precision, g) for g in graphs}
    kh = [known[i] for i in live if known[i] is not None]
    present = {}
    for g in graphs:
        g_id = st.model_id(keys[g], create=False) if kh else None
        present[g] = int((st.rows(g_id, kh) >= 0).sum()) if g_id is not None else 0
    if runtime == "onnx":
        use_jit = "onnx"
    elif jit != "auto":
        use_jit = bool(jit)
    elif any(present.values()):  # keep using the kind most of these vectors are (ties: last)
        use_jit = max(reversed(graphs), key=lambda g: present[g])
    elif "onnx" in graphs:
        use_jit = "onnx"
    else:
        use_jit = len(live) >= JIT_MIN_IMAGES
    requested_key = keys[use_jit]
    mid = st.model_id(requested_key)

    # --- 3. what is done already: known path, vector and decode facts, no thumbnail wanted
    rows = np.full(n, -1, np.int64)
    complete = np.zeros(n, bool)  # the store has size, phash and stats (this thumb side)
    if kh:
        kidx = [i for i in live if known[i] is not None]
        rows[kidx] = st.rows(mid, kh)
        complete[kidx] = st.image_facts(kh, n_stats, thumb_size).complete
    del kh
    work, done = [], []
    for i in live:
        h = known[i]
        if (h is not None and rows[i] >= 0 and complete[i]
                and not (sink is not None and sink.need(i, h))):
            done.append(i)
        else:
            work.append(i)
    del complete
    need_model = any(known[i] is None or rows[i] < 0 for i in work)

    # --- 4. the model, when anything may need a forward pass
    state: dict[str, Any] = {"runner": None, "prep": None, "info": None}
    if need_model and engine == "local":
        t0 = time.perf_counter()
        runner, prep, info = open_runner(
            name, checkpoint, batch_size=batch_size, graph=use_jit, precision=precision,
            device=device, threads=threads,
            onnx_cache=_onnx_cache(requested_key) if use_jit == "onnx" else None,
            onnx_required=runtime == "onnx")
        dim = info["embedding_dim"]
        state.update(runner=runner, prep=prep, info=info)
        timings["model_load"] = time.perf_counter() - t0
        actual_key = model_key(name, checkpoint, runner.precision, runner.jit)
        if actual_key != requested_key:  # bf16 or tracing fell back: key what was used
            mid = st.alias(requested_key, actual_key)
            _recheck(st, mid, known, done, work, rows)
    elif need_model:  # ray: the actors load the model; the driver only needs the shape
        from explorer.stages import ray_engine

        dim, prep_cfg, info = ray_engine.model_shape(name, checkpoint)
        state.update(prep=Preprocessor(prep_cfg), info=info)
        state["info"].update(jit=use_jit, precision=precision)
    else:
        dim = st.dim(mid) or 0

    out = np.empty((n if keep else 0, dim), np.float32)
    have = np.zeros(n, bool)  # rows of out that are filled
    hashes: list[str | None] = list(known)
    width = np.zeros(n, np.int64)
    height = np.zeros(n, np.int64)
    sized = np.zeros(n, bool)  # width/height known (decoded now or read from the store)
    phash = np.zeros(n, np.uint64)
    stats = np.full((n, n_stats), np.nan, np.float32)
    n_read = n_decoded = 0

    decoder = Decoder(state["prep"], thumb_size=thumb_size, max_bytes=max_bytes, sink=sink,
                      store_path=(str(st.folder / "index.sqlite") if st.folder is not None
                                  else None), model_id=mid, n_stats=n_stats,
                      raw_jpeg=gpu_decode and engine == "local")
    tasks = [(i, paths[i], known[i]) for i in work]

    def take(items: list[Item], vecs: np.ndarray | None) -> None:
        # items whose vector was made now carry a (emptied) pixels array, in vecs' order
        nonlocal n_read, n_decoded
        infos, files = [], []
        for it in items:
            if it.error is not None:
                errors[it.index] = it.error
                continue
            n_read += 1
            hashes[it.index] = it.hash
            files.append(it)
            if it.decoded:
                n_decoded += 1
                width[it.index], height[it.index] = it.size
                sized[it.index] = True
                phash[it.index] = np.uint64(it.phash)
                stats[it.index] = it.stats
                infos.append(it)
        fresh = [it for it in items if it.error is None and it.pixels is not None]
        if fresh:
            idx = [it.index for it in fresh]
            if keep:
                out[idx] = vecs
            have[idx] = True
        with st.transaction():
            if fresh:
                st.put(mid, [it.hash for it in fresh], vecs)
            if infos:
                st.put_images([it.hash for it in infos], [it.size[0] for it in infos],
                              [it.size[1] for it in infos], [it.phash for it in infos],
                              [it.stats for it in infos], thumb_size)
            if files:
                st.put_files([paths[it.index] for it in files], sizes[[it.index for it in files]],
                             mtimes[[it.index for it in files]], [it.hash for it in files])

    bar = Bar(len(tasks), "Embedding", unit="img", enabled=progress)
    torch = None
    if not getattr(state["runner"], "numpy_input", False) and need_model:
        import torch  # the onnxruntime runner from the cache runs without it

        old_threads = torch.get_num_threads()
    try:
        if tasks:
            if engine == "ray":
                from explorer.stages import ray_engine

                runs = ray_engine.run(tasks, decoder, name=name, checkpoint=checkpoint,
                                      batch_size=batch_size, jit=use_jit, precision=precision,
                                      address=ray_address, timings=timings)
            elif loader:
                runs = _run_loader(tasks, decoder, state, batch_size, workers, timings)
            else:
                if torch is not None:
                    torch.set_num_threads(threads)
                runs = _run_threads(tasks, decoder, state, batch_size, workers, chunk_size,
                                    timings)
            for items, vecs in runs:
                take(items, vecs)
                bar.advance(len(items))
    finally:
        if torch is not None:
            torch.set_num_threads(old_threads)
        bar.close()

    # --- 5. whatever was not computed now comes from the store (only those rows are read)
    okmask = np.ones(n, bool)
    okmask[list(errors)] = False
    fill = np.flatnonzero(okmask & ~have)
    n_cached = len(fill)
    if len(fill) and keep:
        r = st.rows(mid, [hashes[i] for i in fill])
        missing = int((r < 0).sum())
        if missing:  # cannot happen unless the store changed under us
            raise RuntimeError(f"{missing} vectors vanished from the store {st.folder}")
        for a in range(0, len(fill), 4096):
            out[fill[a:a + 4096]] = st.read(mid, r[a:a + 4096])
    need_facts = np.flatnonzero(okmask & ~sized)
    for a in range(0, len(need_facts), 65_536):  # the store's facts, a block at a time
        part = need_facts[a:a + 65_536]
        f = st.image_facts([hashes[i] for i in part], n_stats)
        width[part], height[part] = f.width, f.height
        phash[part[f.has_phash]] = f.phash[f.has_phash]
        stats[part[f.has_stats]] = f.stats[f.has_stats]

    ok = np.flatnonzero(okmask)
    emb = None
    if keep:
        # compact in place: rows only move towards the front, one block (a copy) at a time
        for a in range(0, len(ok), 4096):
            part = ok[a:a + 4096]
            out[a:a + len(part)] = out[part]
        emb = out[:len(ok)] if len(ok) else np.zeros((0, 0), np.float32)
    info = state["info"] or model_info(name, checkpoint, dim=dim or None)
    info.setdefault("jit", use_jit is True)
    info.setdefault("runtime", "onnxruntime" if use_jit == "onnx" else "torch")
    info.setdefault("precision", precision)
    info.update(device=device, batch_size=batch_size, workers=workers, torch_threads=threads,
                engine=engine, loader=bool(loader), model_key=requested_key,
                gpu_decode=bool(decoder.raw_jpeg))
    if device == "cpu" and info["precision"] == "bfloat16":
        info["cpu_bf16_native"] = cpu_runs_bf16()  # else emulated (slow)
    timings["total"] = time.perf_counter() - t_start
    return EmbedResult(
        embeddings=emb,
        ok=ok,
        width=width[ok],
        height=height[ok],
        hashes=[hashes[i] for i in ok],
        errors=[(str(paths[i]), errors[i]) for i in sorted(errors)],
        n_cached=n_cached,
        phash=phash[ok],
        stats=stats[ok],
        n_read=n_read,
        n_decoded=n_decoded,
        timings=timings,
        model_info=info,
    )


def _onnx_cache(key: str) -> Path:
    """The user-cache file for the ONNX export of the model ``key`` names (its weights'
    content is in the key), per torch version (read without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    from explorer.paths import user_cache_file

    try:
        tv = version("torch")
    except PackageNotFoundError:
        tv = "?"
    return user_cache_file("onnx", f"{key}|torch {tv}|opset 17|v2", ".onnx")


def _recheck(st, mid, known, done, work, rows) -> None:
    """After the model id changed: done items without a vector under it become work."""
    if not done:
        return
    r = st.rows(mid, [known[i] for i in done])
    keep = []
    for i, x in zip(list(done), r):
        rows[i] = x
        (keep if x >= 0 else work).append(i)
    done[:] = keep
    work.sort()


def _run_threads(tasks, decoder, state, batch_size, workers, chunk_size, timings):
    """CPU engine: worker threads each decode a chunk and embed its new images."""
    lock = threading.Lock()

    def run_chunk(part):
        t0 = time.perf_counter()
        items = [decoder(t) for t in part]
        t1 = time.perf_counter()
        new = [it for it in items if it.pixels is not None]
        vecs = None
        if new:
            runner, prep = state["runner"], state["prep"]
            outs = []
            for b in range(0, len(new), batch_size):
                sub = new[b:b + batch_size]
                px = np.stack([it.pixels for it in sub])
                outs.append(runner(prep.to_array(px) if getattr(runner, "numpy_input", False)
                                   else prep.to_tensor(px)))
            for it in new:
                it.pixels = np.empty(0, np.uint8)  # marks "vector made now", frees memory
            vecs = np.concatenate(outs)
        t2 = time.perf_counter()
        with lock:
            timings["decode"] += t1 - t0
            timings["forward"] += t2 - t1
        return items, vecs

    chunks = [tasks[a:a + chunk_size] for a in range(0, len(tasks), chunk_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explorer-embed") as pool:
        pending: deque = deque()
        todo = iter(chunks)

        def submit_next() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(run_chunk, nxt))

        for _ in range(2 * workers):  # a bounded window keeps memory flat
            submit_next()
        try:
            while pending:
                items, vecs = pending.popleft().result()
                submit_next()
                yield items, vecs
        except BaseException:
            for f in pending:
                f.cancel()
            raise


class _TaskSet:
    """A torch Dataset over decode tasks (the DataLoader's worker processes run the decoder)."""

    def __init__(self, tasks, decoder):
        self.tasks, self.decoder = tasks, decoder

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, j):
        t0 = time.perf_counter()
        it = self.decoder(self.tasks[j])
        it._t = time.perf_counter() - t0
        return it


def _collate(items):
    import torch

    px = [it.pixels for it in items if it.pixels is not None]
    batch = torch.from_numpy(np.stack(px)) if px else None
    for it in items:
        if it.pixels is not None:
            it.pixels = np.empty(0, np.uint8)
    return items, batch


def _run_loader(tasks, decoder, state, batch_size, workers, timings):
    """CUDA/MPS engine: DataLoader worker processes decode; pinned uint8 batches go to the
    device, which normalises them and runs the model."""
    import torch
    from torch.utils.data import DataLoader

    runner, prep = state["runner"], state["prep"]
    pin = runner is not None and runner.device.type == "cuda"
    nw = max(1, min(workers, len(tasks)))
    dl = DataLoader(_TaskSet(tasks, decoder), batch_size=batch_size, shuffle=False,
                    num_workers=nw, collate_fn=_collate, pin_memory=pin,
                    prefetch_factor=4, persistent_workers=False,
                    multiprocessing_context="fork" if os.name == "posix" else None)
    for items, batch in dl:
        timings["decode"] += sum(getattr(it, "_t", 0.0) for it in items)
        vecs = None
        if batch is not None:
            t0 = time.perf_counter()
            vecs = runner.embed_uint8(batch, prep)
            timings["forward"] += time.perf_counter() - t0
        if any(it.jpeg is not None for it in items):
            vecs = _device_jpegs(items, vecs, decoder, runner, prep, timings)
        yield items, vecs


def _device_jpegs(items, vecs, decoder, runner, prep, timings):
    """The items the workers left as raw JPEG: decoded and embedded on the model's device
    (CPU decode for those it cannot decode). Returns every new vector in ``items`` order
    (what ``take`` expects), ``vecs`` being those of the CPU-decoded batch."""
    from PIL import Image as PILImage

    cpu_new = [it for it in items if it.pixels is not None]  # embedded above, in order
    jp = [it for it in items if it.jpeg is not None]
    t0 = time.perf_counter()
    sizes, x, thumbs = decode_jpeg_batch([it.jpeg for it in jp], prep, decoder.thumb_size,
                                         runner.device)
    timings["decode"] += time.perf_counter() - t0
    row: dict[int, np.ndarray] = {}
    if vecs is not None:
        row.update((id(it), v) for it, v in zip(cpu_new, vecs))
    on_device, fallback = [], []
    for it, size, th in zip(jp, sizes, thumbs):
        data, it.jpeg = it.jpeg, None
        if size is None:  # CMYK, corrupt, ...: the CPU path (and its error messages)
            decoder.decode(it, data, f"image {it.index}", need_px=True)
            if it.pixels is not None:
                fallback.append(it)
            continue
        it.size = size
        thumb = PILImage.fromarray(th)
        decoder.describe(it, thumb)
        decoder.to_sink(it, thumb)
        it.pixels = np.empty(0, np.uint8)  # "vector made now"
        on_device.append(it)
    t0 = time.perf_counter()
    if on_device:
        row.update((id(it), v) for it, v in zip(on_device, runner.embed_uint8(x, prep)))
    if fallback:
        u8 = np.stack([it.pixels for it in fallback])
        for it in fallback:
            it.pixels = np.empty(0, np.uint8)
        import torch

        got = runner.embed_uint8(torch.from_numpy(u8), prep)
        row.update((id(it), v) for it, v in zip(fallback, got))
    timings["forward"] += time.perf_counter() - t0
    fresh = [it for it in items if it.error is None and it.pixels is not None]
    return np.stack([row[id(it)] for it in fresh]) if fresh else None


def decode_jpeg_batch(datas, prep: Preprocessor, thumb_size: int, device):
    """Decode JPEG bytes with ``torchvision.io.decode_jpeg`` on ``device`` (nvjpeg on
    CUDA, batched), EXIF orientation applied, and make on that device what the CPU path
    makes with PIL: the model input (timm's eval transform for a square centre crop:
    shorter side to ``prep.scale_size``, bicubic, antialiased, then the centre crop) and
    the thumbnail (longer side ``thumb_size``, bilinear, antialiased).

    Returns ``(sizes, x, thumbs)``: per input the original ``(width, height)`` or ``None``
    where it could not be decoded (then its thumbnail is ``None`` too and the caller
    decodes it on the CPU), ``x`` the model inputs of the decoded ones as a uint8 NHWC
    tensor on ``device`` (``None`` when none), and the thumbnails as uint8 (h, w, 3) numpy
    arrays. Needs ``prep.fast`` (square centre crop)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if not prep.fast:
        raise ValueError("decode_jpeg_batch needs a square centre-crop preprocessing")
    n = len(datas)
    sizes: list = [None] * n
    thumbs: list = [None] * n
    if n == 0:
        return sizes, None, thumbs
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        imgs = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device,
                           apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batch: one at a time then
        imgs = []
        for r in raw:
            try:
                imgs.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device,
                                        apply_exif_orientation=True))
            except RuntimeError:
                imgs.append(None)
    xs = []
    for j, img in enumerate(imgs):
        if img is None or img.ndim != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
            continue
        h, w = int(img.shape[1]), int(img.shape[2])
        sizes[j] = (w, h)
        s = prep.scale_size  # torchvision Resize(int): shorter side -> s, longer truncated
        nh, nw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        big = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
        xs.append(TF.center_crop(big, [prep.height, prep.width]))
        scale = thumb_size / max(w, h)
        th = img if scale >= 1 else TF.resize(
            img, [max(1, round(h * scale)), max(1, round(w * scale))],
            interpolation=InterpolationMode.BILINEAR, antialias=True)
        thumbs[j] = th.permute(1, 2, 0).contiguous().cpu().numpy()
    x = torch.stack(xs).permute(0, 2, 3, 1) if xs else None
    return sizes, x, thumbs
