"""Export labelled images as a torchvision ``ImageFolder`` tree (a folder or a zip).

``export_imagefolder(df, image_root, dest)`` writes::

    dest/cat/0001.jpg          one folder per label (safe, collision-free names)
    dest/cat/0002.jpg
    dest/dog/...
    dest/labels.csv            the labelled table + ``export_path`` (where each image went)

ready for ``torchvision.datasets.ImageFolder(dest)`` (which ignores the CSV: only folders
are classes). With ``as_zip=True`` the same tree goes into ``dest`` (a ``.zip``) under one
top folder named after the zip, so unzipping never spills files around.

Rules
-----
* Nothing is ever overwritten: an existing ``dest`` (a file, a zip, a non-empty folder)
  raises :class:`FileExistsError` before anything is written. The tree is built under a
  hidden temporary name beside ``dest`` and renamed at the end, so a crash never leaves a
  half export under the final name.
* Label folders: filesystem-safe (``explorer.export.safe_name``) and distinct even on
  case-insensitive filesystems (``Cat`` and ``cat`` -> ``Cat``, ``cat-2``).
* File names: the original file name, made safe; two images with one name in one label
  folder get ``name-2.jpg``, ``name-3.jpg``...
* Unlabelled images (``""``) and images labelled ``discard`` are skipped by default.
* Missing originals, and paths that point outside ``image_root``, are listed in the
  summary and skipped; they never stop the export. Files whose extension
  ``ImageFolder`` does not load are exported and listed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from explorer.export import folder_names, resolve_source, safe_name, unique_file
from explorer.labels import DISCARD
from explorer.progress import track
from explorer.table import order_columns

__all__ = ["export_imagefolder", "IMAGEFOLDER_EXTENSIONS", "LABELS_CSV", "UNLABELLED"]

#: what torchvision.datasets.ImageFolder loads (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")
#: name of the labels CSV at the top of the tree
LABELS_CSV = "labels.csv"
#: folder for unlabelled images when ``skip_unlabelled=False``
UNLABELLED = "unlabelled"


def export_imagefolder(
    df: pd.DataFrame,
    image_root,
    dest,
    *,
    as_zip: bool = False,
    label_col: str = "label",
    skip_unlabelled: bool = True,
    skip_discard: bool = True,
    path_col: str = "path",
    progress: bool = True,
) -> dict:
    """Write the labelled images of ``df`` as an ImageFolder tree (or zip) at ``dest``.

    Parameters
    ----------
    df:
        A table with ``path`` (relative to ``image_root``) and ``label`` columns, e.g.
        ``labels.labelled_table(df, book)``.
    image_root:
        The folder the ``path`` column is relative to.
    dest:
        The folder (or, with ``as_zip``, the zip file; ``.zip`` is added if missing) to
        create. It must not exist (an empty folder is accepted).
    skip_unlabelled / skip_discard:
        Leave out images without a label / labelled ``discard``. With
        ``skip_unlabelled=False`` they go to a folder ``unlabelled``.

    Returns a JSON-ready summary: ``dest``, ``format``, ``images`` (written), ``classes``
    (label -> count), ``folders`` (label -> folder name), ``skipped_unlabelled``,
    ``skipped_discard``, ``missing`` and ``outside_root`` (paths not exported),
    ``not_loadable`` (exported, but ImageFolder will not load them), ``renamed`` (count of
    files given a new name to avoid a collision), ``labels_csv``.

    Raises ``ValueError`` (missing columns, no image to export, a missing ``image_root``)
    and ``FileExistsError`` (``dest`` exists), both before anything is written.
    """
    for col in (path_col, label_col):
        if col not in df.columns:
            raise ValueError(f"the table has no {col!r} column; cannot export an ImageFolder")
    root = Path(image_root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    dest = Path(dest)
    if as_zip and dest.suffix.lower() != ".zip":
        dest = dest.with_name(dest.name + ".zip")
    if dest.exists() or dest.is_symlink():
        if not (not as_zip and dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
            raise FileExistsError(
                f"{dest} already exists; choose a new name (nothing was overwritten)"
            )

    labels = df[label_col].fillna("").astype(str).str.strip().tolist()
    paths = df[path_col].fillna("").astype(str).tolist()
    skipped_unlabelled = skipped_discard = 0
    plan: list[tuple[int, str, Path]] = []  # (row position, label, source)
    missing: list[str] = []
    outside: list[str] = []
    for pos, (rel, lab) in enumerate(zip(paths, labels)):
        if not lab:
            if skip_unlabelled:
                skipped_unlabelled += 1
                continue
            lab = UNLABELLED
        elif lab == DISCARD and skip_discard:
            skipped_discard += 1
            continue
        if not rel:
            missing.append(rel)
            continue
        src = resolve_source(root, rel)
        if src is None:
            outside.append(rel)
        elif not src.is_file():
            missing.append(rel)
        else:
            plan.append((pos, lab, src))
    if not plan:
        why = []
        if skipped_unlabelled:
            why.append(f"{skipped_unlabelled} unlabelled")
        if skipped_discard:
            why.append(f"{skipped_discard} discarded")
        if missing or outside:
            why.append(f"{len(missing) + len(outside)} missing")
        raise ValueError(
            "no labelled image to export" + (f" ({', '.join(why)})" if why else "")
        )

    folders = folder_names(list(dict.fromkeys(lab for _, lab, _ in plan)), reserved=(LABELS_CSV,))
    used: dict[str, set[str]] = {f: set() for f in folders.values()}
    export_path = [""] * len(df)
    writes: list[tuple[Path, str]] = []
    renamed = 0
    not_loadable: list[str] = []
    classes: dict[str, int] = {}
    for pos, lab, src in plan:
        folder = folders[lab]
        name = unique_file(used[folder], paths[pos])
        if name != safe_name(PurePosixPath(paths[pos]).name, default="image"):
            renamed += 1
        arc = f"{folder}/{name}"
        export_path[pos] = arc
        writes.append((src, arc))
        classes[lab] = classes.get(lab, 0) + 1
        if PurePosixPath(name).suffix.lower() not in IMAGEFOLDER_EXTENSIONS:
            not_loadable.append(paths[pos])

    out = order_columns(df).copy()
    out[label_col] = [UNLABELLED if (not v and not skip_unlabelled) else v for v in labels]
    out["export_path"] = export_path
    exported = out[out["export_path"] != ""]
    csv_bytes = exported.to_csv(index=False).encode("utf-8")

    dest.parent.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if as_zip:
        top = safe_name(dest.stem, default="imagefolder")
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        try:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                for src, arc in track(writes, "zipping the ImageFolder", enabled=progress):
                    try:
                        zf.write(src, f"{top}/{arc}", compress_type=zipfile.ZIP_STORED)
                    except OSError:
                        failed.append(arc)
                zf.writestr(f"{top}/{LABELS_CSV}", csv_bytes,
                            compress_type=zipfile.ZIP_DEFLATED)
            _finish(tmp, dest, is_dir=False)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        tmp = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            for folder in folders.values():
                os.mkdir(os.path.join(tmp, folder))
            for src, arc in track(writes, "copying the ImageFolder", enabled=progress):
                try:
                    with open(src, "rb") as fi, open(os.path.join(tmp, arc), "xb") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 20)
                    shutil.copystat(src, os.path.join(tmp, arc))
                except OSError:
                    failed.append(arc)
            with open(os.path.join(tmp, LABELS_CSV), "xb") as fh:
                fh.write(csv_bytes)
            _finish(tmp, dest, is_dir=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if failed:  # unreadable at copy time: report like a missing original
        by_arc = {arc: rel for rel, arc in zip(paths, export_path) if arc}
        missing += [by_arc[a] for a in failed]
    return {
        "dest": str(dest),
        "format": "zip" if as_zip else "folder",
        "images": len(writes) - len(failed),
        "classes": classes,
        "folders": folders,
        "skipped_unlabelled": skipped_unlabelled,
        "skipped_discard": skipped_discard,
        "missing": missing,
        "outside_root": outside,
        "not_loadable": not_loadable,
        "renamed": renamed,
        "labels_csv": (f"{safe_name(dest.stem, default='imagefolder')}/{LABELS_CSV}"
                       if as_zip else str(dest / LABELS_CSV)),
    }


def _finish(tmp: str, dest: Path, *, is_dir: bool) -> None:
    """Move the finished export to ``dest`` without replacing anything that appeared there."""
    if is_dir:
        if dest.is_dir() and not dest.is_symlink():
            try:
                dest.rmdir()  # only succeeds if it is still empty
            except OSError:
                raise FileExistsError(f"{dest} is no longer empty; nothing was overwritten")
        elif dest.exists() or dest.is_symlink():
            raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten")
        os.rename(tmp, dest)
    else:
        # os.link fails if dest exists: never replaces a file that appeared meanwhile
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten") from None
        except OSError:
            if dest.exists():
                raise FileExistsError(f"{dest} appeared meanwhile; nothing was overwritten")
            os.rename(tmp, dest)
            return
        os.unlink(tmp)
