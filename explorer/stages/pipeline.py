"""``build()``: folder of images -> embeddings -> map -> clusters -> CSV (+ app folder).

``build`` is a short list of stage calls over a :class:`BuildContext`; each stage is a
function below. The stages' work is done by pure modules (``images``, ``embed``,
``reduce``, ``cluster``, ``similarity``, ``table``): arrays in, arrays out. The device
and engine choices are made once, in :func:`_context`. What this module writes:

* ``NAME.csv``            the table (schema: :mod:`explorer.table`)
* ``NAME.errors.csv``     files that were skipped, with the reason
* ``NAME.run.json``       parameters, device, engine, model, versions, counts, stage timings
* ``NAME.features.npy``   one embedding row per CSV row, float16 (neighbours, re-clustering)
* ``NAME.hierarchy.npz``  the Overview/Treemap group hierarchy (:mod:`explorer.stages.hierarchy`),
                          computed once here; the app loads it instead of building it
* ``NAME.duplicates.npz`` the phash index of the duplicate groups (explorer.stages.duplicates): a re-run
                          looks up only the new images, the groups keep their ids
* ``NAME.layout.npz``     per row: content hash, map xy, cluster space, cluster, probability,
                          outlier score - so a re-run can place new images on the same map
* ``NAME.store/``         the vector store (:mod:`explorer.stages.store`): vectors per content hash
                          and model, size, phash, quality statistics; old ``NAME.embeddings/``
                          cache folders are ignored (delete them)
* ``NAME/``               the Bokeh app (copied from ``app_files/``) with thumbnails in
                          ``NAME/static/thumbs/`` (named by path AND content, so a file
                          replaced in place gets a new thumbnail)

Re-runs (``--remap`` off): when the previous layout has the same model, map method and
clustering, and the folder changed by at most :data:`PLACE_MAX_SHARE` (new images and
removed images each at most 10% of the previous rows), the old rows keep their xy,
cluster space and cluster, the new rows are placed with ``reduce.place_new`` and
``cluster.assign_new``; otherwise (or with ``--remap``) everything is recomputed.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from explorer import options as options_mod
from explorer import progress as progress_mod
from explorer import table
from explorer.options import (DEFAULT_MAX_FILE_MB, ENGINES, METHODS,  # noqa: F401 (API)
                              BuildError, BuildOptions)
from explorer.stages.reduce import MAP_METHODS  # noqa: F401 (API)

#: the Bokeh directory-app template that ``--app`` copies
APP_TEMPLATE = Path(__file__).resolve().parents[2] / "app_files"
THUMBS = Path("static") / "thumbs"
#: a re-run places new images on the old map when new and removed rows are each at most
#: this share of the previous rows (and --remap is not given)
PLACE_MAX_SHARE = 0.10


@dataclass
class BuildResult:
    table: pd.DataFrame
    csv_path: Path
    app_dir: Path | None
    errors: list[tuple[str, str]]
    run: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class Images:
    """What the embedding (or classic features) stage yields, one row per usable image."""

    ok: np.ndarray  # indices into ctx.paths
    features: np.ndarray  # (n, D) float32: the map and cluster input
    width: np.ndarray
    height: np.ndarray
    hashes: list[str]  # content hash per row
    phash: np.ndarray | None = None  # uint64 per row
    stats: np.ndarray | None = None  # float32 (n, len(quality.STAT_NAMES))
    classic: Any = None  # the classic method's features (phash/ssim/...), else None
    info: dict[str, Any] = field(default_factory=dict)
    # what the map and the clusters are computed from when --features chose other than the
    # CNN (pixels/hog/autoencoder); ``features`` stays the CNN's (neighbours, search)
    layout_input: np.ndarray | None = None
    choice: dict[str, Any] | None = None
    # (idx, p) top ImageNet classes per row from the embedding process, or why there are none
    concepts: Any = None

    @property
    def for_layout(self) -> np.ndarray:
        return self.features if self.layout_input is None else self.layout_input


@dataclass
class Layout:
    """Map, cluster space and clusters, one row per image."""

    xy: np.ndarray
    space: np.ndarray | None
    labels: np.ndarray
    probabilities: np.ndarray
    outlier_scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    placed: int = 0  # rows placed on the previous map
    recomputed: int = 0  # rows whose map position was computed afresh


@dataclass
class BuildContext:
    """The state the stages share. Stages read it and fill in their part."""

    opts: BuildOptions
    root: Path
    csv_path: Path
    app_dir: Path | None
    device: str  # as asked ("auto" ...) until the embedding stage resolves it
    engine: str  # "local" or "ray"
    console: Any = None  # where the summary is printed (None: quiet)
    events: bool = False  # someone listens to progress events: the stages send them
    stage: Any = None
    source_arg: str = ""  # the positional argument as given
    source: Any = None  # the explorer.inputs.sources.Source that _discover opened
    paths: list[Any] = field(default_factory=list)  # Path, or an archives.Member
    rel: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sink: Any = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def thumb_dir(self) -> Path | None:
        return None if self.app_dir is None else self.app_dir / THUMBS


# --------------------------------------------------------------------------- helpers
def versions() -> dict[str, str]:
    """Versions of the packages that shape the results."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ["bulk-image-explorer", "torch", "torchvision", "timm", "umap-learn", "hdbscan",
                 "scikit-learn", "numpy", "pandas", "pillow", "bokeh", "docarray", "imagehash",
                 "opencv-python-headless", "datasketch", "scikit-image"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolve_outputs(app: str | os.PathLike | None, out: str | os.PathLike | None
                    ) -> tuple[Path | None, Path]:
    """``--app NAME`` -> (NAME/, NAME.csv beside it); ``--out`` overrides the CSV path."""
    if app is None and out is None:
        raise BuildError("say where to write: --app NAME (app folder + NAME.csv) or --out FILE.csv")
    app_dir = Path(app).resolve() if app is not None else None
    if app_dir is not None and (app_dir.name in ("", ".", "..") or app_dir == Path(app_dir.anchor)):
        raise BuildError(f"--app needs a folder name, got {app!r}")
    if out is not None:
        csv = Path(out).resolve()
        if csv.suffix.lower() != ".csv":
            raise BuildError(f"--out must end in .csv, got {out!r}")
    else:
        csv = app_dir.with_name(app_dir.name + ".csv")
    return app_dir, csv


def install_app(app_dir: Path, template: Path = APP_TEMPLATE) -> None:
    """Create or update ``app_dir`` from the template; thumbnails and exports are kept."""
    if not template.is_dir():
        raise BuildError(f"app template not found: {template}")
    app_dir.mkdir(parents=True, exist_ok=True)
    for src in template.rglob("*"):
        rel = src.relative_to(template)
        if "__pycache__" in rel.parts or src.name.endswith(".pyc"):
            continue
        dst = app_dir / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            table.atomic_write_bytes(dst, src.read_bytes())
    (app_dir / THUMBS).mkdir(parents=True, exist_ok=True)


class ThumbSink:
    """Writes thumbnails into the app folder (a picklable callable: runs in worker threads,
    DataLoader processes and Ray tasks). Names carry the relative path's hash AND the file
    content's hash (review M2), so a file replaced in place gets a new thumbnail."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder = Path(folder)
        self.names = names

    def name(self, i: int, content_hash: str) -> str:
        stem = self.names[i][: -len(".jpg")]
        return f"{stem}-{content_hash[:10]}.jpg"

    def need(self, i: int, content_hash: str) -> bool:
        return not (self.folder / self.name(i, content_hash)).is_file()

    def __call__(self, i: int, content_hash: str, img) -> None:
        path = self.folder / self.name(i, content_hash)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        img.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, path)


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def release_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``): many small
    arrays freed after a stage (e.g. a small image's pixels per row) otherwise stay in
    the process's RSS and add to every later stage's peak (measured: 20,000 small images
    and their pixel rows freed left 957 MB resident; trimmed, 40 MB). True when trimmed;
    a no-op elsewhere (other C libraries, Windows, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return False


class _Stages:
    """Stage timer: each stage is a :func:`explorer.progress.stage` (a start and an end
    event), trims the heap after it (:func:`release_memory`) and notes the peak RSS."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float | None] = {}

    @contextmanager
    def __call__(self, name: str):
        with progress_mod.stage(name) as timer:
            yield
            release_memory()
        self.timings[name] = round(timer.seconds, 3)
        self.peak_rss_mb[name] = _peak_rss_mb()


# --------------------------------------------------------------------------- build
def build(
    image_dir: str | os.PathLike,
    *,
    app: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    console=None,
    on_progress: progress_mod.Listener | None = None,
    **options: Any,
) -> BuildResult:
    """Run every stage on ``image_dir`` and write the CSV (and the app folder).

    ``options`` are the build options of :mod:`explorer.options` (they mirror ``explorer
    build --help``). ``on_progress(event)`` receives :class:`explorer.progress.Event` s
    ``(stage, done, total)`` from every stage, the embedding process included; with
    ``progress=True`` (the default) they are also shown on ``console`` (stderr) with the
    summary. Raises :class:`BuildError` (a ``ValueError``) for anything the user can fix;
    unreadable images never stop the run, they are listed in ``NAME.errors.csv`` and in
    ``BuildResult.errors``.
    """
    try:
        opts = options_mod.check(options)
    except TypeError as exc:
        raise TypeError(f"build() got {exc}") from None
    display = None
    if opts.progress:
        display = progress_mod.RichDisplay(console)
        console = display.console
    with progress_mod.reporting(display, on_progress):
        try:
            ctx = _context(image_dir, app, out, opts, console if opts.progress else None)
            ctx.events = display is not None or on_progress is not None
            _discover(ctx)
            _install_app(ctx)
            imgs = _given_vectors(ctx) if opts.vectors is not None else \
                _embed(ctx) if opts.method == "timm" else _classic_features(ctx)
            dups, dup_index = _duplicates(ctx, imgs, _load_duplicate_index(ctx))
            if opts.method == "timm":
                _choose_features(ctx, imgs)
            lay = _layout(ctx, imgs)
            df = _table(ctx, imgs, lay, dups)
            df = _understand(ctx, df, imgs, lay)
            _write(ctx, df, imgs, lay, dup_index)
            _hierarchy(ctx, imgs)
        finally:
            if display is not None:
                display.close()
        return _record(ctx, df, imgs, lay)


# --------------------------------------------------------------------------- stages
def _context(image_dir, app, out, opts: BuildOptions, console) -> BuildContext:
    """The source, the folders, and the device and engine (the one place that chooses them);
    the options were checked by :func:`explorer.options.check`."""
    from explorer.inputs.sources import kind_of

    try:
        kind = kind_of(image_dir)  # folder, archive, table, URL list (explorer.inputs.sources)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    # a remote URL has no local root until _discover copies it (explorer.inputs.sources)
    root = Path(image_dir).expanduser().resolve() if kind != "remote" else Path.cwd()
    if opts.vectors is not None and not Path(opts.vectors).is_file():
        raise BuildError(f"--vectors file not found: {opts.vectors}")
    app_dir, csv_path = resolve_outputs(app, out)
    if kind == "folder" and app_dir is not None and (app_dir == root or root in app_dir.parents):
        raise BuildError(f"the app folder {app_dir} must not lie inside the image folder {root}")
    # the device: "cpu" stays; "auto" / "cuda" / "mps" are resolved where torch is loaded
    # (the embedding process, which fails early when CUDA is asked for and missing); the
    # map stage then follows what the embedding used
    device = opts.device if opts.method == "timm" else "cpu"
    ctx = BuildContext(opts=opts, root=root, csv_path=csv_path, app_dir=app_dir, device=device,
                       engine=opts.engine, console=console, source_arg=os.fspath(image_dir))
    ctx.stage = _Stages()
    return ctx


def _discover(ctx: BuildContext) -> None:
    """The image files, natural order; names that are not valid UTF-8 are skipped with an
    errors.csv line (review H3: the CSV is UTF-8; rename such files to include them)."""
    from explorer.stages import images as images_mod
    from explorer.inputs import sources

    o = ctx.opts
    with ctx.stage("discover"):
        try:
            src = sources.open_source(
                ctx.source_arg, work_dir=table.sidecar(ctx.csv_path, "sources"),
                max_bytes=None if o.max_file_mb is None else int(o.max_file_mb * 2**20),
                allow_private_urls=o.allow_private_urls, console=ctx.console,
                contained=o.contained)
        except ValueError as exc:
            raise BuildError(str(exc)) from None
    ctx.source, ctx.root = src, src.root
    ctx.errors += src.errors
    for p, rel in zip(src.items, src.rel):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            ctx.errors.append((printable_name(rel), "file name is not valid UTF-8 (skipped; "
                               "rename the file to include it)"))
            continue
        ctx.paths.append(p)
        ctx.rel.append(rel)
    if not ctx.paths:
        if ctx.errors:
            _write_errors(ctx.csv_path, ctx.errors)
        raise BuildError(f"no images found in {ctx.root} (looked for "
                         f"{', '.join(sorted(images_mod.IMAGE_EXTENSIONS))})")
    if ctx.console is not None:
        ctx.console.print(f"Found [bold]{len(ctx.paths)}[/bold] images in {ctx.root}")


def printable_name(rel: str) -> str:
    """A relative path as UTF-8 text, losslessly: bytes that are not UTF-8 percent-encoded
    (``os.fsencode`` + ``%XX``); ``urllib.parse.unquote_to_bytes`` gives the bytes back."""
    return quote(os.fsencode(rel), safe="/ !$&'()*+,;=:@~")


def _install_app(ctx: BuildContext) -> None:
    from explorer.stages import images as images_mod

    if ctx.app_dir is None:
        return
    with ctx.stage("app"):
        install_app(ctx.app_dir)
    ctx.sink = ThumbSink(ctx.thumb_dir, images_mod.thumbnail_names(ctx.rel))


def _embed(ctx: BuildContext) -> Images:
    """Embeddings (+ size, phash, quality statistics) through the store.

    With the local engine this runs in a child process (``opts.embed_process``): torch and
    the model live only there, so the build's peak memory is the larger of the embedding
    process and the map process, not their sum. The child writes every vector into the
    store; this process reads the rows it needs from the store's memory-mapped file.
    """
    o = ctx.opts
    store = table.sidecar(ctx.csv_path, "store")
    kw = dict(paths=ctx.paths, model=o.model, checkpoint=o.checkpoint, batch_size=o.batch_size,
              store=store, thumb_size=o.thumb_size, sink=ctx.sink, progress=ctx.events,
              device=ctx.device, engine=ctx.engine, ray_address=o.ray_address,
              max_file_mb=o.max_file_mb, gpu_decode=o.gpu_decode, runtime=o.runtime)
    with ctx.stage("embed"):
        if ctx.engine == "local" and o.embed_process:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _check_readable(ctx)  # before the child's start (seconds) is paid for nothing
            mp = multiprocessing.get_context("spawn")
            queue = mp.Queue() if ctx.events else None
            with progress_mod.relay(queue) if queue is not None else nullcontext():
                with ProcessPoolExecutor(1, mp_context=mp, initializer=_embed_child,
                                         initargs=(os.getpid(), queue)) as ex:
                    res = ex.submit(_embed_job, kw, False).result()
            res["embeddings"] = _read_vectors(store, res["model_info"]["model_key"],
                                              res["hashes"])
        else:
            res = _embed_job(kw, True)
    ctx.device = res["model_info"].get("device", ctx.device)  # "auto", resolved
    ctx.errors += [(_relname(p, ctx.root), r) for p, r in res["errors"]]
    info = dict(res["model_info"])
    info.update(n_cached=int(res["n_cached"]), n_read=int(res["n_read"]),
                n_decoded=int(res["n_decoded"]), embed_timings=res["timings"])
    _check_some(ctx, res["ok"])
    imgs = Images(ok=np.asarray(res["ok"], dtype=int), features=res["embeddings"],
                  width=res["width"], height=res["height"], hashes=res["hashes"],
                  phash=res["phash"], stats=res["stats"], info=info)
    imgs.concepts = res.get("concepts")
    return imgs


def _embed_child(parent_pid: int, queue) -> None:
    """The embedding process's initializer: exit with the build; send its progress events
    to the build over ``queue`` (when someone listens)."""
    exit_with_parent(parent_pid)
    if queue is not None:
        progress_mod.forward_to(queue)


def _check_readable(ctx: BuildContext) -> None:
    """Fail fast: at least one file must open as an image (the first that does ends the
    look, so a good folder pays for one small decode), else every file's reason is written
    to errors.csv and :class:`BuildError` is raised as :func:`_check_some` would, later."""
    from explorer.stages import images as images_mod

    o = ctx.opts
    max_bytes = None if o.max_file_mb is None else int(o.max_file_mb * 2**20)
    errors = []
    for p in ctx.paths:
        try:
            data, _ = images_mod.read_file(p, max_bytes)
            images_mod.decode_image(data, 64, name=p)
            return
        except images_mod.ImageLoadError as exc:
            errors.append((_relname(p, ctx.root), exc.reason))
    ctx.errors += errors
    _check_some(ctx, [])


def exit_with_parent(parent_pid: int, every: float = 0.5) -> None:
    """In a child process: exit as soon as ``parent_pid`` is no longer its parent (the build
    was killed), instead of embedding on for nobody. What it wrote to the store stays, so
    the next run starts from there."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="explorer-exit-with-parent", daemon=True).start()


def _embed_job(kw: dict, with_vectors: bool) -> dict:
    """``embed.embed_paths`` as a plain dict. Without ``with_vectors`` (the embedding child
    process) no (N, D) array is made at all: the vectors go to the store, and the concepts
    are computed from the store a block of rows at a time."""
    from explorer.stages import embed as embed_mod

    kw = {**kw, "model": kw.get("model") or embed_mod.DEFAULT_MODEL}
    if not with_vectors and kw.get("store") is not None:
        kw["vectors"] = False
    res = embed_mod.embed_paths(kw.pop("paths"), **kw)
    out = dict(res.__dict__)
    if res.embeddings is not None:
        blocks = (res.embeddings[a:a + CONCEPT_ROWS]
                  for a in range(0, len(res.embeddings), CONCEPT_ROWS))
        n = len(res.embeddings)
    else:
        blocks = _store_blocks(kw["store"], res.model_info["model_key"], res.hashes)
        n = len(res.hashes)
    out["concepts"] = _concepts_of(blocks, n, kw["model"], kw.get("checkpoint"))
    if not with_vectors:
        out["embeddings"] = None
    return out


#: rows per block when computing concepts (a (rows, 1000) probability block at a time:
#: at a million rows all at once it would be 4 GB)
CONCEPT_ROWS = 16_384


def _store_blocks(store_path, key: str, hashes: list[str], rows: int = CONCEPT_ROWS):
    """The stored vectors of ``hashes``, ``rows`` at a time (only those rows are read)."""
    from explorer.stages.store import Store

    with Store(store_path) as st:
        mid = st.model_id(key)
        for a in range(0, len(hashes), rows):
            r = st.rows(mid, hashes[a:a + rows])
            if (r < 0).any():
                raise BuildError(f"the store {store_path} lacks {(r < 0).sum()} vectors just made")
            yield st.read(mid, r)


def _concepts_of(blocks, n: int, model, checkpoint):
    """Top ImageNet classes ``(idx, p)`` of ``n`` vectors given as row blocks, where torch
    is already loaded (the embedding process), or the reason there are none (a backbone
    without that classifier)."""
    from explorer.stages import concepts as concepts_mod

    if n == 0:
        return "no vectors"
    idx, p = [], []
    try:
        W, b = concepts_mod.classifier_weights(model, checkpoint)
        for block in blocks:
            i, q = concepts_mod.top_concepts(concepts_mod.class_probabilities(block, W, b))
            idx.append(i)
            p.append(q)
    except ValueError as exc:
        return str(exc)
    return np.concatenate(idx), np.concatenate(p)


def _read_vectors(store_path: Path, key: str, hashes: list[str]) -> np.ndarray:
    from explorer.stages.store import Store

    with Store(store_path) as st:
        mid = st.model_id(key)
        out = np.empty((len(hashes), st.dim(mid) or 0), np.float32)
        rows = st.rows(mid, hashes)
        if (rows < 0).any():
            raise BuildError(f"the store {store_path} lacks {(rows < 0).sum()} vectors just made")
        for a in range(0, len(hashes), 65536):
            st.read(mid, rows[a:a + 65536], out=out[a:a + 65536])
    return out


def _classic_features(ctx: BuildContext) -> Images:
    """Classic methods: one decode per image gives the feature, thumbnail, size, map row."""
    from explorer.stages import similarity

    o = ctx.opts
    max_bytes = None if o.max_file_mb is None else int(o.max_file_mb * 2**20)
    with ctx.stage("features"):
        feats, ok, errs, w, h, rows, hashes = similarity.features_and_thumbnails(
            ctx.paths, o.method, thumb_size=o.thumb_size, sink=ctx.sink, max_bytes=max_bytes,
            progress=ctx.events)
    ctx.errors += [(_relname(p, ctx.root), r) for p, r in errs]
    _check_some(ctx, ok)
    return Images(ok=np.asarray(ok, dtype=int), features=rows, width=w, height=h,
                  hashes=hashes, classic=feats, info={"method": o.method})


def _given_vectors(ctx: BuildContext) -> Images:
    """``--vectors FILE``: your embeddings instead of the model's. Each image is still read
    once (size, content hash, phash, thumbnail: ``similarity.features_and_thumbnails``);
    images that FILE has no row for are error lines."""
    from explorer.inputs import sources
    from explorer.stages import similarity

    o = ctx.opts
    max_bytes = None if o.max_file_mb is None else int(o.max_file_mb * 2**20)
    try:
        keys, vecs = sources.read_vectors(o.vectors)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    row = sources.match_vectors(keys, ctx.rel, ctx.paths)
    with ctx.stage("features"):
        feats, ok, errs, w, h, _, hashes = similarity.features_and_thumbnails(
            ctx.paths, "phash", thumb_size=o.thumb_size, sink=ctx.sink, max_bytes=max_bytes,
            progress=o.progress)
    ctx.errors += [(_relname(p, ctx.root), r) for p, r in errs]
    has = row[ok] >= 0
    ctx.errors += [(ctx.rel[i], f"no row for it in --vectors {Path(o.vectors).name}")
                   for i in np.asarray(ok)[~has]]
    _check_some(ctx, np.asarray(ok)[has])
    used = row[ok][has]
    return Images(ok=np.asarray(ok)[has], features=vecs[used], width=np.asarray(w)[has],
                  height=np.asarray(h)[has], hashes=[x for x, k in zip(hashes, has) if k],
                  phash=np.asarray(feats, np.uint64)[has],
                  info={"method": "vectors", "name": Path(o.vectors).name,
                        "model_key": f"vectors:{Path(o.vectors).name}:{vecs.shape[1]}",
                        "rows_given": len(keys), "rows_used": int(has.sum())},
                  concepts="your own vectors (--vectors) have no ImageNet classifier")


def _check_some(ctx: BuildContext, ok) -> None:
    if len(ok) == 0:
        _write_errors(ctx.csv_path, ctx.errors)
        raise BuildError(f"none of the {len(ctx.paths)} files in {ctx.root} could be read as "
                         f"an image; see {table.sidecar(ctx.csv_path, 'errors.csv')}")


def _duplicates(ctx: BuildContext, imgs: Images, index=None):
    """Near-duplicate groups and the phash index they came from: ``(labels, index)``.

    phash (from the embedding stage, no decode): ``index`` (the previous run's
    :class:`explorer.stages.duplicates.DuplicateIndex`, or None) is brought up to date with
    :func:`explorer.stages.duplicates.regroup`: only images it has not seen are looked up,
    groups keep their ids. ``cnn+orb``: the CNN vectors' near neighbours verified by ORB
    keypoints (:func:`explorer.stages.duplicates.group_cnn_orb`). Other methods:
    :func:`similarity.find_groups`."""
    o = ctx.opts
    if o.duplicates == "none":
        return None, None
    from explorer.stages import duplicates
    from explorer.stages import similarity

    with ctx.stage("duplicates"):
        if o.duplicates == "phash":
            hv = imgs.phash if imgs.phash is not None else np.asarray(imgs.classic, np.uint64) \
                if o.method == "phash" else None
            # which phash (the embedding's of the thumbnail, the classic one of the file)
            source = f"phash:{o.method}:{'vectors' if o.vectors else 'store'}:{o.thumb_size}"
            if hv is None:  # classic non-phash method: phash of the map rows' bits
                bits = (imgs.features[:, :64] > 0.5).astype(np.uint8)
                hv = np.frombuffer(np.packbits(bits, axis=1).tobytes(), ">u8").astype(np.uint64)
                source = f"bits:{o.method}"
            thr = (o.duplicate_threshold if o.duplicate_threshold is not None
                   else similarity.DEFAULT_THRESHOLDS["phash"])
            keys = [f"{ctx.rel[i]}\t{h}" for i, h in zip(imgs.ok, imgs.hashes)]
            labels, index = duplicates.regroup(index, keys, hv, similarity.max_distance_for(thr),
                                           source=source)
            return np.asarray(labels, dtype=int), index
        if o.duplicates == "cnn+orb":
            if o.method != "timm" and o.vectors is None:
                raise BuildError("--duplicates cnn+orb needs embeddings (--method timm, the "
                                 "default, or --vectors)")
            thr = (o.duplicate_threshold if o.duplicate_threshold is not None
                   else duplicates.CNN_ORB_THRESHOLD)
            labels, _ = duplicates.group_cnn_orb(
                imgs.features, duplicates.orb_reader([ctx.paths[i] for i in imgs.ok]), threshold=thr)
            return np.asarray(labels, dtype=int), None
        g = similarity.find_groups([ctx.paths[i] for i in imgs.ok], o.duplicates,
                                   threshold=o.duplicate_threshold, progress=ctx.events)
        return np.asarray(g.labels), None


def _load_duplicate_index(ctx: BuildContext):
    """The previous run's phash index (``NAME.duplicates.npz``), or None (also when this
    run does not group by phash)."""
    from explorer.stages import duplicates

    if ctx.opts.duplicates != "phash":
        return None
    return duplicates.load_index(table.sidecar(ctx.csv_path, "duplicates.npz"))


def _layout(ctx: BuildContext, imgs: Images) -> Layout:
    """Map + cluster space + clusters: placed on the previous layout when the folder barely
    changed (see the module docstring), else computed with ``reduce.map_and_space``."""
    o = ctx.opts
    if o.method != "timm":
        return _classic_layout(ctx, imgs)
    key = _layout_key(ctx, imgs)
    prev = None if o.remap else _load_layout(ctx.csv_path, key)
    if prev is not None:
        lay = _place(ctx, imgs, prev)
        if lay is not None:
            return lay
    from explorer.stages import cluster as cluster_mod
    from explorer.stages.reduce import map_and_space

    with ctx.stage("map"):
        m = map_and_space(imgs.for_layout, map_method=o.map_method, random_state=o.seed,
                          device=ctx.device if ctx.device.startswith("cuda") else "cpu",
                          progress=ctx.events)
    ctx.notes += list(m.notes)
    with ctx.stage("cluster"):
        cres = cluster_mod.cluster(m.space, o.cluster, random_state=o.seed, progress=ctx.events,
                                   **options_mod.cluster_params(o))
    ctx.notes += list(getattr(cres, "notes", []) or [])
    info = {"map": _jsonable(m.info), "clustering": _jsonable(cres.to_dict())}
    if cres.elbow is not None:
        elbow_path = table.sidecar(ctx.csv_path, "elbow.html")
        cluster_mod.elbow_plot(cres.elbow, cres.elbow.get("chosen_k"), elbow_path)
        info["clustering"]["elbow_plot"] = elbow_path.name
    n = len(imgs.ok)
    return Layout(xy=np.asarray(m.xy, float), space=np.asarray(m.space, np.float32),
                  labels=np.asarray(cres.labels, int),
                  probabilities=np.asarray(cres.probabilities, float),
                  outlier_scores=np.asarray(cres.outlier_scores, float),
                  info=info, placed=0, recomputed=n)


def _classic_layout(ctx: BuildContext, imgs: Images) -> Layout:
    from explorer.stages import similarity
    from explorer.stages.reduce import map_and_space

    o = ctx.opts
    with ctx.stage("map"):
        m = map_and_space(imgs.features, map_method=o.map_method, random_state=o.seed,
                          device="cpu", progress=ctx.events)
    ctx.notes += list(m.notes)
    with ctx.stage("cluster"):
        g = similarity.group(imgs.classic, o.method, threshold=o.threshold, progress=ctx.events)
    labels = np.asarray(g.labels, dtype=int)
    info = {"map": _jsonable(m.info), "clustering": {
        "method": f"{o.method} links (connected components)", "params": {"threshold": g.threshold},
        "n_pairs_compared": int(g.n_pairs_compared), "n_links": int(g.n_links),
        "complete": bool(getattr(g, "complete", True))}}
    if not getattr(g, "complete", True):
        ctx.notes.append(f"{o.method} grouping compared a sample of the pairs (batched merge): "
                         "some near-duplicates may be in separate groups")
    return Layout(xy=np.asarray(m.xy, float), space=None, labels=labels,
                  probabilities=(labels >= 0).astype(float),
                  outlier_scores=(labels < 0).astype(float), info=info, recomputed=len(labels))


def _table(ctx: BuildContext, imgs: Images, lay: Layout, dups) -> pd.DataFrame:
    ok = imgs.ok
    if ctx.sink is not None:
        images_col = [(THUMBS / ctx.sink.name(i, h)).as_posix() for i, h in zip(ok, imgs.hashes)]
    else:
        images_col = [""] * len(ok)
    df = table.make_table(
        paths=[ctx.rel[i] for i in ok], images=images_col, xy=lay.xy, cluster=lay.labels,
        probability=lay.probabilities, outlier_score=lay.outlier_scores, width=imgs.width,
        height=imgs.height, duplicate_group=dups,
    )
    if ctx.source is not None and ctx.source.columns is not None:  # a table input's columns
        from explorer.inputs.sources import add_table_columns

        df = add_table_columns(df, ctx.source.columns)
    if ctx.opts.metadata is not None:
        from explorer.stages import metadata as metadata_mod

        meta = metadata_mod.read_metadata(ctx.opts.metadata, ctx.opts.key)
        df, report = metadata_mod.join_metadata(df, meta, ctx.opts.key)
        df.attrs["metadata_report"] = report.to_dict()
    return df


def _write(ctx: BuildContext, df: pd.DataFrame, imgs: Images, lay: Layout,
           dup_index=None) -> None:
    with ctx.stage("write"):
        if dup_index is not None:  # the phash index a re-run checks new images against
            dup_index.save(table.sidecar(ctx.csv_path, "duplicates.npz"))
        table.write_table(df, ctx.csv_path)
        _write_errors(ctx.csv_path, ctx.errors)
        _save_npy_f16(table.sidecar(ctx.csv_path, "features.npy"), imgs.features)
        if lay.space is not None:
            _save_layout(ctx.csv_path, _layout_key(ctx, imgs), imgs.hashes, lay)


def _hierarchy(ctx: BuildContext, imgs: Images) -> None:
    """The group hierarchy of the Overview and Treemap tabs, built from the stored features
    and written to ``NAME.hierarchy.npz`` with their fingerprint (the app checks it); kept
    as it is when the previous build's was made from the same images and features."""
    import hashlib

    from explorer.stages import hierarchy

    n = len(imgs.features)
    if n == 0:
        return
    path = table.sidecar(ctx.csv_path, "hierarchy.npz")
    fp, params = hierarchy.fingerprint(imgs.features), hierarchy.overview_params(n)
    source = hashlib.sha256("\n".join(imgs.hashes).encode()).hexdigest()[:32]
    with ctx.stage("hierarchy"):
        if path.is_file():
            try:
                hierarchy.load_tree(path, n, fingerprint=fp, params=params, source=source)
                return
            except ValueError:  # another build's, or unreadable: build it again
                pass
        tree = hierarchy.build_hierarchy(imgs.features, **params, progress=ctx.events)
        hierarchy.save_tree(path, tree, fp, source)


def _record(ctx: BuildContext, df: pd.DataFrame, imgs: Images, lay: Layout) -> BuildResult:
    o = ctx.opts
    labels = lay.labels
    mi = imgs.info
    run = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("explorer") else None,
        "image_dir": str(ctx.root),
        "source": {"kind": ctx.source.kind, "given": str(ctx.source.given),
                   "vectors": str(o.vectors) if o.vectors else None},
        # the same folder relative to the CSV's folder: still right after the two move together
        "image_dir_from_csv": os.path.relpath(ctx.root, ctx.csv_path.parent),
        "csv": ctx.csv_path.name,
        "app": str(ctx.app_dir) if ctx.app_dir else None,
        "parameters": options_mod.record(o),  # as asked; "model": None is the default
        # what was actually used (after "auto" and fallbacks)
        "execution": {"device": mi.get("device", "cpu"), "engine": ctx.engine,
                      "batch_size": mi.get("batch_size"), "precision": mi.get("precision"),
                      "jit": mi.get("jit"), "runtime": mi.get("runtime"),
                      "workers": mi.get("workers"),
                      "gpu_decode": bool(mi.get("gpu_decode")),
                      "seed": o.seed, "reproducible": o.seed is not None},
        "model": mi,
        "map": lay.info.get("map"),
        "features": imgs.choice,
        "clustering": lay.info.get("clustering"),
        "counts": {
            "found": len(ctx.paths), "rows": int(len(df)), "skipped": len(ctx.errors),
            "cached": int(mi.get("n_cached", 0)), "decoded": int(mi.get("n_decoded", len(df))),
            "placed": int(lay.placed), "recomputed": int(lay.recomputed),
            "clusters": int(len(set(labels.tolist()) - {-1})),
            "noise": int((labels < 0).sum()),
            "duplicate_groups": int(len(set(df["duplicate_group"]) - {-1})),
        },
        "metadata": df.attrs.pop("metadata_report", None),
        "notes": ctx.notes,
        "timings": {**ctx.stage.timings, "total": round(time.perf_counter() - ctx.t_start, 3)},
        "peak_rss_mb_after": ctx.stage.peak_rss_mb,  # process peak so far, after each stage
        "versions": versions(),
    }
    table.write_json(table.sidecar(ctx.csv_path, "run.json"), run)
    result = BuildResult(df, ctx.csv_path, ctx.app_dir, ctx.errors, run, ctx.notes)
    if ctx.console is not None:
        print_summary(result, ctx.console)
    return result


# --------------------------------------------------------------------------- understand
def _small_images(ctx: BuildContext, imgs: Images, size: int, rows: np.ndarray | None = None) -> list:
    """A small RGB image per row (or per row of ``rows``, positions in ``imgs.ok``) for the
    pixel/HOG/autoencoder features: the app's thumbnail when there is one (no decode of the
    original), else the original decoded at ``size``."""
    from PIL import Image

    from explorer.stages import images as images_mod
    from explorer.progress import track

    out = []
    pairs = list(zip(imgs.ok, imgs.hashes))
    if rows is not None:
        pairs = [pairs[int(r)] for r in rows]
    for i, h in track(pairs, "Small images", ctx.events):
        img = None
        if ctx.sink is not None:
            p = ctx.thumb_dir / ctx.sink.name(int(i), h)
            if p.is_file():
                try:
                    with Image.open(p) as im:
                        im.draft("RGB", (size, size))
                        img = im.convert("RGB")
                except OSError:
                    img = None
        if img is None:
            try:
                img = images_mod.load_image(ctx.paths[int(i)], size)[0]
            except (OSError, ValueError):
                img = Image.new("RGB", (size, size))
        img = img.copy()
        img.thumbnail((size, size))
        out.append(img)
    return out


def _choose_features(ctx: BuildContext, imgs: Images) -> None:
    """``--features``: keep the CNN, or compute pixels / HOG / autoencoder features from small
    images, or (``auto``) choose among cnn, pixels and hog by cluster structure. Sets
    ``imgs.layout_input`` (what the map and clusters use) and ``imgs.choice`` (run record)."""
    from explorer.stages import features as F

    o = ctx.opts
    want = o.features
    n = len(imgs.ok)
    if want == "cnn":
        imgs.choice = {"requested": "cnn", "name": "cnn", "reason": "asked for"}
        return
    if want == "auto" and n < F.AUTO_MIN_IMAGES:
        imgs.choice = {"requested": "auto", "name": "cnn", "reason":
                       f"only {n} images (auto compares options from {F.AUTO_MIN_IMAGES} on)"}
        return
    seed = 0 if o.seed is None else o.seed
    with ctx.stage("features"):
        cache = F.FeatureCache(table.sidecar(ctx.csv_path, "features"))
        if want == "auto":  # the choice is cached by content hashes (a re-run reuses it)
            choice, X = F.auto_features(
                imgs.features, lambda rows=None: _small_images(ctx, imgs, F.SMALL_SIZE, rows), seed=seed,
                hashes=imgs.hashes, cache=cache, model=imgs.info.get("model_key"),
                progress=ctx.events)
            imgs.choice = {"requested": "auto", **choice.to_dict()}
            if X is not None:
                imgs.layout_input = X
        else:
            small = _small_images(ctx, imgs, F.SMALL_SIZE)
            imgs.layout_input = F.compute(want, small, seed=seed, ae_loss=o.ae_loss,
                                          hashes=imgs.hashes, cache=cache, progress=ctx.events)
            imgs.choice = {"requested": want, "name": want, "reason": "asked for",
                           **({"ae_loss": o.ae_loss} if want == "autoencoder" else {})}
    if ctx.console is not None:
        ctx.console.print(f"features: [bold]{imgs.choice['name']}[/bold] "
                          f"({imgs.choice['reason']})")


def _understand(ctx: BuildContext, df: pd.DataFrame, imgs: Images, lay: Layout) -> pd.DataFrame:
    """Concepts sidecar (top ImageNet classes per row), ``cluster_name`` and quality flags."""
    from explorer.stages import concepts as concepts_mod
    from explorer.stages import quality

    idx = p = None
    with ctx.stage("concepts"):
        got = imgs.concepts
        if isinstance(got, tuple) and len(got[0]) == len(df):
            idx, p = got
            concepts_mod.save_concepts(table.sidecar(ctx.csv_path, "concepts.npz"), idx, p)
        elif ctx.opts.method == "timm":  # a backbone without an ImageNet-1k classifier
            ctx.notes.append(f"no ImageNet concepts (cluster names, search by concept): {got}")
        groups = {"folder": concepts_mod.folder_of(df["path"].tolist())}
        for col in df.columns:
            if col not in table.COLUMNS and df[col].dtype == object:
                groups[col] = df[col].tolist()
        names = concepts_mod.name_clusters(df["cluster"].to_numpy(), idx, p, groups=groups)
        df["cluster_name"] = [names[int(c)] for c in df["cluster"]]
    if imgs.stats is not None and len(imgs.stats) == len(df):
        fl = quality.flags(imgs.stats, imgs.width, imgs.height, imgs.hashes)
        for c in fl.columns:
            df[c] = fl[c].astype(int).to_numpy()
    return df


# --------------------------------------------------------------------------- map + placement
def _layout_key(ctx: BuildContext, imgs: Images) -> str:
    o = ctx.opts
    return "|".join([str(imgs.info.get("model_key", imgs.info.get("name"))),
                     str((imgs.choice or {}).get("name", "cnn")), o.map_method,
                     o.cluster, repr(sorted(options_mod.cluster_params(o).items()))])


def _save_layout(csv_path: Path, key: str, hashes: list[str], lay: Layout) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), hashes=np.array(hashes, dtype="U32"),
             xy=np.asarray(lay.xy, np.float32), space=np.asarray(lay.space, np.float32),
             labels=lay.labels.astype(np.int64), probabilities=lay.probabilities,
             outlier_scores=lay.outlier_scores)
    table.atomic_write_bytes(table.sidecar(csv_path, "layout.npz"), buf.getvalue())


def _load_layout(csv_path: Path, key: str):
    path = table.sidecar(csv_path, "layout.npz")
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in ("hashes", "xy", "space", "labels", "probabilities",
                                      "outlier_scores")}
    except Exception:  # an unreadable layout only means a full recompute
        return None


def _place(ctx: BuildContext, imgs: Images, prev: dict) -> Layout | None:
    """Keep the previous rows' layout and place the new rows, when few changed."""
    old_row = {h: r for r, h in reversed(list(enumerate(prev["hashes"].tolist())))}
    cur = imgs.hashes
    kept = np.array([h in old_row for h in cur], bool)
    n_old, n_new = len(prev["hashes"]), int((~kept).sum())
    n_removed = len(set(old_row) - set(cur))
    if n_old < 20 or n_new > PLACE_MAX_SHARE * n_old or n_removed > PLACE_MAX_SHARE * n_old:
        return None
    from explorer.stages import cluster as cluster_mod
    from explorer.stages import reduce as reduce_mod

    rows = np.array([old_row[h] for h, k in zip(cur, kept) if k], np.int64)
    xy = np.empty((len(cur), 2), np.float64)
    space = np.empty((len(cur), prev["space"].shape[1]), np.float32)
    labels = np.empty(len(cur), np.int64)
    probs = np.empty(len(cur), np.float64)
    outl = np.empty(len(cur), np.float64)
    xy[kept], space[kept], labels[kept] = prev["xy"][rows], prev["space"][rows], prev["labels"][rows]
    probs[kept], outl[kept] = prev["probabilities"][rows], prev["outlier_scores"][rows]
    if n_new:
        with ctx.stage("place"):
            X_old, X_new = imgs.for_layout[kept], imgs.for_layout[~kept]
            xy[~kept] = reduce_mod.place_new(X_old, prev["xy"][rows], X_new, k=15)
            z_new = reduce_mod.place_new(X_old, prev["space"][rows], X_new, k=15)
            space[~kept] = z_new
            lab, p = cluster_mod.assign_new(prev["space"][rows], prev["labels"][rows], z_new,
                                            k=10)
            labels[~kept], probs[~kept] = lab, p
            outl[~kept] = 1.0 - np.asarray(p, float)
    ctx.notes.append(f"placed {n_new} new image(s) on the previous map ({n_removed} removed); "
                     "use --remap to recompute the map and the clusters")
    return Layout(xy=xy, space=space, labels=labels, probabilities=probs, outlier_scores=outl,
                  info={"map": {"placed_on_previous": True}, "clustering": {
                      "placed_on_previous": True, "method": ctx.opts.cluster}},
                  placed=n_new, recomputed=0)


# --------------------------------------------------------------------------- internals
def _relname(p, root: Path) -> str:
    member_prefix = f"{root}!/"  # an archive member (explorer.inputs.archives.Member)
    if str(p).startswith(member_prefix):
        return str(p)[len(member_prefix):]
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return o


def _write_errors(csv_path: Path, errors: list[tuple[str, str]]) -> None:
    path = table.sidecar(csv_path, "errors.csv")
    table.atomic_write_text(path, pd.DataFrame(errors, columns=["path", "reason"]).to_csv(index=False))


def _save_npy_f16(path: Path, arr: np.ndarray) -> None:
    """``arr`` as float16 .npy, converted a block at a time (no full-size copy), atomic."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=arr.shape)
    for a in range(0, len(arr), 65536):
        out[a:a + 65536] = arr[a:a + 65536]
    out.flush()
    del out
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def print_summary(result: BuildResult, console) -> None:
    from rich.table import Table

    run = result.run
    c = run["counts"]
    t = Table(title="explorer build", show_header=False, box=None)
    t.add_row("images found", str(c["found"]))
    t.add_row("rows written", str(c["rows"]))
    t.add_row("skipped (unreadable)", str(c["skipped"]))
    t.add_row("embeddings from the store", str(c["cached"]))
    t.add_row("images decoded", str(c["decoded"]))
    t.add_row("map", f"{c['placed']} placed on the previous map, {c['recomputed']} recomputed")
    ex = run.get("execution", {})
    t.add_row("device", f"{ex.get('device')} ({ex.get('engine')}, batch {ex.get('batch_size')}, "
              f"{ex.get('precision')}, {'seed ' + str(ex['seed']) if ex.get('reproducible') else 'parallel, not reproducible'})")
    t.add_row("clusters", f"{c['clusters']} (+{c['noise']} noise/outliers)")
    t.add_row("near-duplicate groups", str(c["duplicate_groups"]))
    t.add_row("time", f"{run['timings']['total']:.1f} s")
    t.add_row("CSV", str(result.csv_path))
    if result.app_dir is not None:
        t.add_row("app", str(result.app_dir))
    console.print(t)
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} file(s) skipped[/yellow] "
                      f"(see {table.sidecar(result.csv_path, 'errors.csv').name}):")
        for p, r in result.errors[:10]:
            console.print(f"  {p}: {r}", markup=False, highlight=False)
        if len(result.errors) > 10:
            console.print(f"  ... and {len(result.errors) - 10} more")
    if result.app_dir is not None:
        rel_app = os.path.relpath(result.app_dir)
        rel_csv = os.path.relpath(result.csv_path)
        console.print(f"Explore it: [bold]bokeh serve {rel_app} --args {rel_csv}[/bold]")
