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
        return _embed(paths, EmbedRun(
            name=name, checkpoint=checkpoint, batch_size=batch_size, store=store,
            thumb_size=thumb_size, sink=sink, progress=progress, workers=workers,
            threads=threads, jit=jit, precision=precision, device=device, loader=loader,
            engine=engine, ray_address=ray_address, chunk_size=chunk_size, max_bytes=max_bytes,
            n_stats=n_stats, t_start=t_start, keep=bool(vectors), gpu_decode=bool(gpu_decode),
            graphs=graphs, runtime=runtime))
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


@dataclass
class EmbedRun:
    """One call of :func:`embed_paths`: its checked options, then what each step of
    :func:`_embed` finds (steps 1-3 fill the plan, step 4 the model; :class:`_Collected`
    holds what the files give)."""

    # ---- the options, checked by embed_paths
    name: str
    checkpoint: Any
    batch_size: int
    store: Any  # a Store, or a _NoStore that keeps nothing
    thumb_size: int
    sink: Any
    progress: bool
    workers: int
    threads: int
    jit: bool | str
    precision: str
    device: str
    loader: bool
    engine: str
    ray_address: str | None
    chunk_size: int
    max_bytes: int | None
    n_stats: int
    t_start: float
    keep: bool = True
    gpu_decode: bool = False
    graphs: tuple = (False, True)
    runtime: str = "auto"
    # ---- 1. the files
    paths: list = field(default_factory=list)
    timings: dict[str, float] = field(
        default_factory=lambda: {"model_load": 0.0, "decode": 0.0, "forward": 0.0})
    #: file index -> why it was skipped
    errors: dict[int, str] = field(default_factory=dict)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtimes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: indices of the files that can be read
    live: list[int] = field(default_factory=list)
    #: each file's content hash when the store knows its path unchanged
    known: list[str | None] = field(default_factory=list)
    # ---- 2. the model key
    use_jit: bool | str = False
    requested_key: str = ""
    mid: int = 0
    # ---- 3. what is done already
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    work: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    need_model: bool = False
    # ---- 4. the model (runner, prep, info: what the engines read) and its width
    model: dict[str, Any] = field(default_factory=lambda: {"runner": None, "prep": None, "info": None})
    dim: int = 0

    @property
    def n(self) -> int:
        return len(self.paths)


def _embed(paths, run: EmbedRun) -> EmbedResult:
    """The five steps of :func:`embed_paths` over ``run`` (options checked)."""
    run.paths = [p if isinstance(p, Member) else Path(p) for p in paths]  # archive members stay
    if run.store is None:
        run.store = _NoStore()
    _stat_files(run)
    _choose_key(run)
    _plan_work(run)
    _open_model(run)
    got = _Collected.empty(run)
    decoder = _embed_work(run, got)
    _fill_from_store(run, got)
    return _result(run, got, decoder)


def _stat_files(run: EmbedRun) -> None:
    """1. stat every file (refuse the too large ones unread), known hashes by path."""
    n, errors = run.n, run.errors
    run.sizes, run.mtimes = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, p in enumerate(run.paths):
        try:
            size, mtime = stat_item(p)
        except FileNotFoundError:
            errors[i] = "file not found"
            continue
        except OSError as exc:
            errors[i] = f"cannot read ({exc.strerror or exc})"
            continue
        run.sizes[i], run.mtimes[i] = size, mtime
        if run.max_bytes is not None and size > run.max_bytes:
            from explorer.stages.images import _too_large

            errors[i] = _too_large(size, run.max_bytes)
    live = run.live = [i for i in range(n) if i not in errors]
    run.known = [None] * n
    found = run.store.known_hashes([run.paths[i] for i in live], run.sizes[live], run.mtimes[live])
    for i, h in zip(live, found):
        run.known[i] = h


def _choose_key(run: EmbedRun) -> None:
    """2. the model key: graph (eager / jit / onnx) and precision as they will be used."""
    st, graphs = run.store, run.graphs
    keys = {g: model_key(run.name, run.checkpoint, run.precision, g) for g in graphs}
    kh = [run.known[i] for i in run.live if run.known[i] is not None]
    present = {}
    for g in graphs:
        g_id = st.model_id(keys[g], create=False) if kh else None
        present[g] = int((st.rows(g_id, kh) >= 0).sum()) if g_id is not None else 0
    if run.runtime == "onnx":
        use_jit = "onnx"
    elif run.jit != "auto":
        use_jit = bool(run.jit)
    elif any(present.values()):  # keep using the kind most of these vectors are (ties: last)
        use_jit = max(reversed(graphs), key=lambda g: present[g])
    elif "onnx" in graphs:
        use_jit = "onnx"
    else:
        use_jit = len(run.live) >= JIT_MIN_IMAGES
    run.use_jit = use_jit
    run.requested_key = keys[use_jit]
    run.mid = st.model_id(run.requested_key)


def _plan_work(run: EmbedRun) -> None:
    """3. what is done already: known path, vector and decode facts, no thumbnail wanted."""
    st, known, sink = run.store, run.known, run.sink
    rows = run.rows = np.full(run.n, -1, np.int64)
    complete = np.zeros(run.n, bool)  # the store has size, phash and stats (this thumb side)
    kidx = [i for i in run.live if known[i] is not None]
    if kidx:
        kh = [known[i] for i in kidx]
        rows[kidx] = st.rows(run.mid, kh)
        complete[kidx] = st.image_facts(kh, run.n_stats, run.thumb_size).complete
    for i in run.live:
        h = known[i]
        if (h is not None and rows[i] >= 0 and complete[i]
                and not (sink is not None and sink.need(i, h))):
            run.done.append(i)
        else:
            run.work.append(i)
    run.need_model = any(known[i] is None or rows[i] < 0 for i in run.work)


def _open_model(run: EmbedRun) -> None:
    """4. the model, when anything may need a forward pass (the Ray actors load their own)."""
    if run.need_model and run.engine == "local":
        t0 = time.perf_counter()
        runner, prep, info = open_runner(
            run.name, run.checkpoint, batch_size=run.batch_size, graph=run.use_jit,
            precision=run.precision, device=run.device, threads=run.threads,
            onnx_cache=_onnx_cache(run.requested_key) if run.use_jit == "onnx" else None,
            onnx_required=run.runtime == "onnx")
        run.dim = info["embedding_dim"]
        run.model.update(runner=runner, prep=prep, info=info)
        run.timings["model_load"] = time.perf_counter() - t0
        actual_key = model_key(run.name, run.checkpoint, runner.precision, runner.jit)
        if actual_key != run.requested_key:  # bf16 or tracing fell back: key what was used
            run.mid = run.store.alias(run.requested_key, actual_key)
            _recheck(run.store, run.mid, run.known, run.done, run.work, run.rows)
    elif run.need_model:  # ray: the actors load the model; the driver only needs the shape
        from explorer.stages import ray_engine

        run.dim, prep_cfg, info = ray_engine.model_shape(run.name, run.checkpoint)
        run.model.update(prep=Preprocessor(prep_cfg), info=info)
        run.model["info"].update(jit=run.use_jit, precision=run.precision)
    else:
        run.dim = run.store.dim(run.mid) or 0


@dataclass
class _Collected:
    """What the files give, per file index: the vectors (``out``, rows filled where
    ``have``), hashes, sizes, phash and statistics."""

    out: np.ndarray
    have: np.ndarray
    hashes: list[str | None]
    width: np.ndarray
    height: np.ndarray
    #: width/height known (decoded now or read from the store)
    sized: np.ndarray
    phash: np.ndarray
    stats: np.ndarray
    n_read: int = 0
    n_decoded: int = 0

    @classmethod
    def empty(cls, run: EmbedRun) -> "_Collected":
        n = run.n
        return cls(out=np.empty((n if run.keep else 0, run.dim), np.float32),
                   have=np.zeros(n, bool), hashes=list(run.known),
                   width=np.zeros(n, np.int64), height=np.zeros(n, np.int64),
                   sized=np.zeros(n, bool), phash=np.zeros(n, np.uint64),
                   stats=np.full((n, run.n_stats), np.nan, np.float32))

    def take(self, run: EmbedRun, items: list[Item], vecs: np.ndarray | None) -> None:
        """Keep a run of decoded items and their vectors, and write them to the store.
        Items whose vector was made now carry an (emptied) pixels array, in ``vecs``' order."""
        st = run.store
        infos, files = [], []
        for it in items:
            if it.error is not None:
                run.errors[it.index] = it.error
                continue
            self.n_read += 1
            self.hashes[it.index] = it.hash
            files.append(it)
            if it.decoded:
                self.n_decoded += 1
                self.width[it.index], self.height[it.index] = it.size
                self.sized[it.index] = True
                self.phash[it.index] = np.uint64(it.phash)
                self.stats[it.index] = it.stats
                infos.append(it)
        fresh = [it for it in items if it.error is None and it.pixels is not None]
        if fresh:
            idx = [it.index for it in fresh]
            if run.keep:
                self.out[idx] = vecs
            self.have[idx] = True
        with st.transaction():
            if fresh:
                st.put(run.mid, [it.hash for it in fresh], vecs)
            if infos:
                st.put_images([it.hash for it in infos], [it.size[0] for it in infos],
                              [it.size[1] for it in infos], [it.phash for it in infos],
                              [it.stats for it in infos], run.thumb_size)
            if files:
                at = [it.index for it in files]
                st.put_files([run.paths[i] for i in at], run.sizes[at], run.mtimes[at],
                             [it.hash for it in files])


def _embed_work(run: EmbedRun, got: _Collected) -> Decoder:
    """5. read, decode and embed the work through the chosen engine; returns the decoder."""
    st = run.store
    decoder = Decoder(run.model["prep"], thumb_size=run.thumb_size, max_bytes=run.max_bytes,
                      sink=run.sink,
                      store_path=(str(st.folder / "index.sqlite") if st.folder is not None
                                  else None), model_id=run.mid, n_stats=run.n_stats,
                      raw_jpeg=run.gpu_decode and run.engine == "local")
    tasks = [(i, run.paths[i], run.known[i]) for i in run.work]
    bar = Bar(len(tasks), "Embedding", unit="img", enabled=run.progress)
    torch = None
    if not getattr(run.model["runner"], "numpy_input", False) and run.need_model:
        import torch  # the onnxruntime runner from the cache runs without it

        old_threads = torch.get_num_threads()
    try:
        if tasks:
            if run.engine == "ray":
                from explorer.stages import ray_engine

                runs = ray_engine.run(tasks, decoder, name=run.name, checkpoint=run.checkpoint,
                                      batch_size=run.batch_size, jit=run.use_jit,
                                      precision=run.precision, address=run.ray_address,
                                      timings=run.timings)
            elif run.loader:
                runs = _run_loader(tasks, decoder, run.model, run.batch_size, run.workers,
                                   run.timings)
            else:
                if torch is not None:
                    torch.set_num_threads(run.threads)
                runs = _run_threads(tasks, decoder, run.model, run.batch_size, run.workers,
                                    run.chunk_size, run.timings)
            for items, vecs in runs:
                got.take(run, items, vecs)
                bar.advance(len(items))
    finally:
        if torch is not None:
            torch.set_num_threads(old_threads)
        bar.close()
    return decoder


def _fill_from_store(run: EmbedRun, got: _Collected) -> None:
    """6. whatever was not computed now comes from the store (only those rows are read)."""
    st, n_stats = run.store, run.n_stats
    okmask = _ok_mask(run)
    fill = np.flatnonzero(okmask & ~got.have)
    if len(fill) and run.keep:
        r = st.rows(run.mid, [got.hashes[i] for i in fill])
        missing = int((r < 0).sum())
        if missing:  # cannot happen unless the store changed under us
            raise RuntimeError(f"{missing} vectors vanished from the store {st.folder}")
        for a in range(0, len(fill), 4096):
            got.out[fill[a:a + 4096]] = st.read(run.mid, r[a:a + 4096])
    need_facts = np.flatnonzero(okmask & ~got.sized)
    for a in range(0, len(need_facts), 65_536):  # the store's facts, a block at a time
        part = need_facts[a:a + 65_536]
        f = st.image_facts([got.hashes[i] for i in part], n_stats)
        got.width[part], got.height[part] = f.width, f.height
        got.phash[part[f.has_phash]] = f.phash[f.has_phash]
        got.stats[part[f.has_stats]] = f.stats[f.has_stats]


def _ok_mask(run: EmbedRun) -> np.ndarray:
    okmask = np.ones(run.n, bool)
    okmask[list(run.errors)] = False
    return okmask


def _result(run: EmbedRun, got: _Collected, decoder: Decoder) -> EmbedResult:
    """7. the rows that worked, compacted in place, and the model's description."""
    okmask = _ok_mask(run)
    n_cached = int((okmask & ~got.have).sum())
    ok = np.flatnonzero(okmask)
    emb = None
    if run.keep:
        out = got.out
        # compact in place: rows only move towards the front, one block (a copy) at a time
        for a in range(0, len(ok), 4096):
            part = ok[a:a + 4096]
            out[a:a + len(part)] = out[part]
        emb = out[:len(ok)] if len(ok) else np.zeros((0, 0), np.float32)
    info = run.model["info"] or model_info(run.name, run.checkpoint, dim=run.dim or None)
    info.setdefault("jit", run.use_jit is True)
    info.setdefault("runtime", "onnxruntime" if run.use_jit == "onnx" else "torch")
    info.setdefault("precision", run.precision)
    info.update(device=run.device, batch_size=run.batch_size, workers=run.workers,
                torch_threads=run.threads, engine=run.engine, loader=bool(run.loader),
                model_key=run.requested_key, gpu_decode=bool(decoder.raw_jpeg))
    if run.device == "cpu" and info["precision"] == "bfloat16":
        info["cpu_bf16_native"] = cpu_runs_bf16()  # else emulated (slow)
    run.timings["total"] = time.perf_counter() - run.t_start
    return EmbedResult(
        embeddings=emb,
        ok=ok,
        width=got.width[ok],
        height=got.height[ok],
        hashes=[got.hashes[i] for i in ok],
        errors=[(str(run.paths[i]), run.errors[i]) for i in sorted(run.errors)],
        n_cached=n_cached,
        phash=got.phash[ok],
        stats=got.stats[ok],
        n_read=got.n_read,
        n_decoded=got.n_decoded,
        timings=run.timings,
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
