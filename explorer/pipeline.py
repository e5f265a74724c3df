"""``build()``: folder of images -> embeddings -> map -> clusters -> CSV (+ app folder).

The stages themselves are pure (``images``, ``embed``, ``reduce``, ``cluster``,
``similarity``, ``table``); this module runs them in order and is the one place (with
the CLI and the app) that writes files:

* ``NAME.csv``            the table (schema: :mod:`explorer.table`)
* ``NAME.errors.csv``     files that were skipped, with the reason
* ``NAME.run.json``       parameters, model, package versions, counts, stage timings
* ``NAME.features.npy``   one embedding row per CSV row (for neighbours and re-clustering)
* ``NAME.embeddings/``    the embedding cache, keyed by file content hash and model
* ``NAME/``               the Bokeh app (copied from ``app_files/``) with thumbnails in
                          ``NAME/static/thumbs/``
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from explorer import table

#: the Bokeh directory-app template that ``--app`` copies
APP_TEMPLATE = Path(__file__).resolve().parent.parent / "app_files"
THUMBS = Path("static") / "thumbs"
METHODS = ("timm", "phash", "ssim", "orb", "minhash", "tm")


class BuildError(ValueError):
    """The build cannot run (bad folder, no images, bad parameters)."""


@dataclass
class BuildResult:
    table: pd.DataFrame
    csv_path: Path
    app_dir: Path | None
    errors: list[tuple[str, str]]
    run: dict[str, Any]
    notes: list[str] = field(default_factory=list)


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


def _save_thumbnail(img, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="JPEG", quality=85)
    os.replace(tmp, path)


class _Stages:
    """Stage timer that also prints a line per stage."""

    def __init__(self, console):
        self.timings: dict[str, float] = {}
        self.console = console

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        if self.console is not None:
            self.console.print(f"[dim]{name}: {self.timings[name]:.1f} s[/dim]")


# --------------------------------------------------------------------------- build
def build(
    image_dir: str | os.PathLike,
    *,
    app: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    method: str = "timm",
    model: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    cluster: str = "hdbscan",
    cluster_params: dict[str, Any] | None = None,
    threshold: float | None = None,
    duplicates: str | None = "phash",
    duplicate_threshold: float | None = None,
    batch_size: int | None = None,
    thumb_size: int = 256,
    seed: int = 42,
    metadata: str | os.PathLike | None = None,
    key: str | None = None,
    progress: bool = True,
    console=None,
) -> BuildResult:
    """Run every stage on ``image_dir`` and write the CSV (and the app folder).

    Parameters mirror ``explorer build --help``. Raises :class:`BuildError` (a ``ValueError``)
    for anything the user can fix; unreadable images never stop the run, they are listed in
    ``NAME.errors.csv`` and in ``BuildResult.errors``.
    """
    from explorer import images as images_mod

    if console is None and progress:
        from rich.console import Console

        console = Console(stderr=True)
    if method not in METHODS:
        raise BuildError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size is not None and batch_size < 1:
        raise BuildError(f"--batch-size must be >= 1, got {batch_size}")
    if thumb_size < 16:
        raise BuildError(f"--thumb-size must be >= 16, got {thumb_size}")
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise BuildError(f"image folder not found: {image_dir}")
    root = root.resolve()
    app_dir, csv_path = resolve_outputs(app, out)
    if app_dir is not None and (app_dir == root or root in app_dir.parents):
        raise BuildError(f"the app folder {app_dir} must not lie inside the image folder {root}")

    stage = _Stages(console if progress else None)
    notes: list[str] = []
    t_start = time.perf_counter()

    with stage("discover"):
        if console is not None:
            with console.status(f"Looking for images in {root} ..."):
                paths = images_mod.discover(root)
        else:
            paths = images_mod.discover(root)
    if not paths:
        raise BuildError(f"no images found in {root} (looked for "
                         f"{', '.join(sorted(images_mod.IMAGE_EXTENSIONS))})")
    rel = [p.relative_to(root).as_posix() for p in paths]
    if console is not None:
        console.print(f"Found [bold]{len(paths)}[/bold] images in {root}")

    thumb_dir = None
    thumb_names: list[str] = images_mod.thumbnail_names(rel)
    if app_dir is not None:
        with stage("app"):
            install_app(app_dir)
        thumb_dir = app_dir / THUMBS

    hashes_of_thumbs: dict[int, Any] = {}
    want_phash = duplicates == "phash"

    def need_thumbnail(i: int) -> bool:
        if thumb_dir is None:
            return want_phash
        return want_phash or not (thumb_dir / thumb_names[i]).is_file()

    def on_thumbnail(i: int, img) -> None:
        if thumb_dir is not None and not (thumb_dir / thumb_names[i]).is_file():
            _save_thumbnail(img, thumb_dir / thumb_names[i])
        if want_phash:
            from explorer.similarity import phash_of

            hashes_of_thumbs[i] = phash_of(img)

    model_info: dict[str, Any] = {}
    cluster_info: dict[str, Any] = {}
    dup_labels = None
    feats_for_map: np.ndarray
    if method == "timm":
        from explorer import embed as embed_mod

        cache = table.sidecar(csv_path, "embeddings")
        with stage("embed"):
            res = embed_mod.embed_paths(
                paths, model=model or embed_mod.DEFAULT_MODEL, checkpoint=checkpoint,
                batch_size=batch_size or 8, cache=cache, thumb_size=thumb_size,
                on_thumbnail=on_thumbnail, need_thumbnail=need_thumbnail, progress=progress,
            )
        ok = np.asarray(res.ok, dtype=int)
        feats = np.asarray(res.embeddings, dtype=np.float32)
        width, height = np.asarray(res.width), np.asarray(res.height)
        errors = [(_relname(p, root), r) for p, r in res.errors]
        model_info = dict(res.model_info)
        model_info["n_cached"] = int(res.n_cached)
        model_info["embed_timings"] = res.timings
        feats_for_map = feats
    else:
        from explorer import similarity

        with stage("features"):
            sfeats, ok, serrors = similarity.compute_features(paths, method, progress=progress)
            ok = np.asarray(ok, dtype=int)
        errors = [(_relname(p, root), r) for p, r in serrors]
        with stage("thumbnails"):
            width, height, feats_for_map = _thumbnails_and_describe(
                [paths[i] for i in ok], ok, thumb_size, on_thumbnail, need_thumbnail, progress)
        feats = feats_for_map
        model_info = {"method": method}

    if len(ok) == 0:
        _write_errors(csv_path, errors)
        raise BuildError(f"none of the {len(paths)} files in {root} could be read as an image; "
                         f"see {table.sidecar(csv_path, 'errors.csv')}")

    # --- thumbnails for images that were served from the cache and not decoded
    if want_phash:
        with stage("duplicates"):
            missing = [i for i in ok if i not in hashes_of_thumbs]
            for i in missing:
                img = _open_thumb(thumb_dir, thumb_names[i], paths[i], thumb_size)
                if img is not None:
                    on_thumbnail(i, img)
            from explorer.similarity import DEFAULT_THRESHOLDS, group_hashes

            thr = duplicate_threshold if duplicate_threshold is not None else DEFAULT_THRESHOLDS["phash"]
            max_d = int(np.floor((1.0 - thr) * 64 + 1e-9))  # phash similarity = 1 - d/64
            hv = np.array([hashes_of_thumbs.get(i, 0) for i in ok], dtype=np.uint64)
            dup_labels = np.asarray(group_hashes(hv, max_d), dtype=int)
    elif duplicates not in (None, "none"):
        from explorer import similarity

        with stage("duplicates"):
            g = similarity.find_groups([paths[i] for i in ok], duplicates,
                                       threshold=duplicate_threshold, progress=progress)
            dup_labels = np.asarray(g.labels)

    # --- reduce and cluster
    from explorer import cluster as cluster_mod
    from explorer import reduce as reduce_mod

    with stage("map"):
        xy, map_notes = _as_notes(
            reduce_mod.reduce_map(feats_for_map, random_state=seed, progress=progress))
    notes += map_notes
    if method == "timm":
        with stage("cluster"):
            Z, z_notes = _as_notes(
                reduce_mod.reduce_cluster_space(feats, random_state=seed, progress=progress))
            notes += z_notes
            cres = cluster_mod.cluster(Z, cluster, random_state=seed, progress=progress,
                                       **(cluster_params or {}))
        labels = np.asarray(cres.labels, dtype=int)
        probs = np.asarray(cres.probabilities, dtype=float)
        outl = np.asarray(cres.outlier_scores, dtype=float)
        notes += list(getattr(cres, "notes", []) or [])
        cluster_info = _jsonable(cres.to_dict())
        if cres.elbow is not None:
            elbow_path = table.sidecar(csv_path, "elbow.html")
            cluster_mod.elbow_plot(cres.elbow, cres.elbow.get("chosen_k"), elbow_path)
            cluster_info["elbow_plot"] = elbow_path.name
    else:
        from explorer import similarity

        with stage("cluster"):
            g = similarity.group(sfeats, method, threshold=threshold, progress=progress)
        labels = np.asarray(g.labels, dtype=int)
        probs = (labels >= 0).astype(float)
        outl = (labels < 0).astype(float)
        cluster_info = {"method": f"{method} links (connected components)",
                        "params": {"threshold": g.threshold},
                        "n_pairs_compared": int(g.n_pairs_compared), "n_links": int(g.n_links)}

    # --- table
    images_col = [(THUMBS / thumb_names[i]).as_posix() if thumb_dir is not None else ""
                  for i in ok]
    df = table.make_table(
        paths=[rel[i] for i in ok], images=images_col, xy=xy, cluster=labels, probability=probs,
        outlier_score=outl, width=width, height=height, duplicate_group=dup_labels,
    )
    meta_report = None
    if metadata is not None:
        from explorer import metadata as metadata_mod

        meta = metadata_mod.read_metadata(metadata, key)
        df, report = metadata_mod.join_metadata(df, meta, key)
        meta_report = report.to_dict()

    # --- write
    with stage("write"):
        table.write_table(df, csv_path)
        _write_errors(csv_path, errors)
        feats_path = table.sidecar(csv_path, "features.npy")
        _save_npy(feats_path, feats.astype(np.float16))
    n_clusters = int(len(set(labels.tolist()) - {-1}))
    run = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("explorer") else None,
        "image_dir": str(root),
        # the same folder relative to the CSV's folder: still right after the two move together
        "image_dir_from_csv": os.path.relpath(root, csv_path.parent),
        "csv": csv_path.name,
        "app": str(app_dir) if app_dir else None,
        "parameters": {
            "method": method, "model": model_info.get("name", model), "checkpoint":
                str(checkpoint) if checkpoint else None, "cluster": cluster,
            "cluster_params": cluster_params or {}, "threshold": threshold,
            "duplicates": duplicates, "duplicate_threshold": duplicate_threshold,
            "batch_size": batch_size, "thumb_size": thumb_size, "seed": seed,
            "metadata": str(metadata) if metadata else None, "key": key,
        },
        "model": model_info,
        "clustering": cluster_info,
        "counts": {
            "found": len(paths), "rows": int(len(df)), "skipped": len(errors),
            "cached": int(model_info.get("n_cached", 0)), "clusters": n_clusters,
            "noise": int((labels < 0).sum()),
            "duplicate_groups": int(len(set(df["duplicate_group"]) - {-1})),
        },
        "metadata": meta_report,
        "notes": notes,
        "timings": {**stage.timings, "total": round(time.perf_counter() - t_start, 3)},
        "versions": versions(),
    }
    table.write_json(table.sidecar(csv_path, "run.json"), run)
    result = BuildResult(df, csv_path, app_dir, errors, run, notes)
    if console is not None:
        print_summary(result, console)
    return result


# --------------------------------------------------------------------------- internals
def _relname(p, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _as_notes(res) -> tuple[np.ndarray, list[str]]:
    """Accept ``array``, ``(array, notes)`` or an object with ``.embedding``/``.notes``."""
    if isinstance(res, tuple) and len(res) == 2:
        arr, notes = res
    elif hasattr(res, "embedding"):
        arr, notes = res.embedding, getattr(res, "notes", [])
    else:
        arr, notes = res, []
    if isinstance(notes, str):
        notes = [notes] if notes else []
    return np.asarray(arr, dtype=float), list(notes or [])


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


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    table.atomic_write_bytes(path, buf.getvalue())


def _open_thumb(thumb_dir, name, original, size):
    from PIL import Image

    from explorer import images as images_mod

    try:
        if thumb_dir is not None and (thumb_dir / name).is_file():
            with Image.open(thumb_dir / name) as im:
                return im.convert("RGB")
        img, _ = images_mod.load_image(original, size)
        return images_mod.thumbnail(img, size)
    except (OSError, ValueError):
        return None


def _thumbnails_and_describe(paths, ok, thumb_size, on_thumbnail, need_thumbnail, progress):
    """Classic methods: one decode per image for the thumbnail, the size and the map vector."""
    from explorer import images as images_mod
    from explorer.similarity import describe

    from explorer.progress import track

    width, height, chunk, rows = [], [], [], []
    for i, p in track(list(zip(ok, paths)), "Thumbnails", progress):
        img, (w, h) = images_mod.load_image(p, thumb_size)
        t = images_mod.thumbnail(img, thumb_size)
        if need_thumbnail(i):
            on_thumbnail(i, t)
        width.append(w)
        height.append(h)
        chunk.append(t)
        if len(chunk) == 512:  # bounded memory: describe thumbnails a chunk at a time
            rows.append(describe(chunk))
            chunk = []
    if chunk:
        rows.append(describe(chunk))
    return np.array(width), np.array(height), np.concatenate(rows).astype(np.float32)


def print_summary(result: BuildResult, console) -> None:
    from rich.table import Table

    run = result.run
    c = run["counts"]
    t = Table(title="explorer build", show_header=False, box=None)
    t.add_row("images found", str(c["found"]))
    t.add_row("rows written", str(c["rows"]))
    t.add_row("skipped (unreadable)", str(c["skipped"]))
    t.add_row("embeddings from cache", str(c["cached"]))
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
