"""What ``explorer build SOURCE`` reads: the one place that tells input kinds apart.

:func:`kind_of` names the kind of the positional argument, :func:`open_source` turns it into
a :class:`Source`: the readable items (a :class:`~pathlib.Path` or an archive
:class:`~explorer.inputs.archives.Member`), the CSV ``path`` value of each, the error lines of what
was refused, and, for a table, its other columns.

======== ============================== ================================================
kind     SOURCE                         items, CSV ``path`` and ``image_dir`` (run.json)
======== ============================== ================================================
folder   a folder                       files found by :func:`explorer.stages.images.discover`;
                                        path relative to the folder
zip/tar  ``photos.zip``, ``.tar``,      members read in place (:mod:`explorer.inputs.archives`);
         ``.tar.gz``/``.tgz``/``.bz2``  path = the member's name; ``image_dir`` = the
         /``.xz``                       archive (a compressed tar: its plain copy
                                        ``NAME.sources/source.tar`` beside the CSV)
table    ``list.csv``, ``.parquet``     the files its ``path`` (or Hugging Face
                                        ``file_name``) column names (relative to the
                                        table's folder, a build CSV's image folder, or
                                        absolute); path relative to the folder that
                                        holds them all; ``label`` and the other columns
                                        are joined to the CSV
urls     ``urls.txt``                   each http(s) URL downloaded once into
                                        ``NAME.sources/urls/`` beside the CSV (the rules of
                                        :mod:`explorer.inputs.urlfetch`); path relative to it
remote   ``s3://bucket/prefix``, any    each image file copied once into
         fsspec URL (``[cloud]``)       ``NAME.sources/remote/``; path relative to the
                                        prefix
======== ============================== ================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from explorer.inputs import archives
from explorer.paths import UnsafePath, check_image_root

#: a Hugging Face ``imagefolder`` metadata file's path column (read here, written by
#: :func:`explorer.curation.exports.export_hf`)
HF_FILE_NAME = "file_name"

__all__ = ["Source", "kind_of", "open_source", "TABLE_SUFFIXES", "URL_LIST_SUFFIXES",
           "read_table_input"]

#: table inputs (a ``path`` column)
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: URL lists (one http(s) URL per line)
URL_LIST_SUFFIXES = (".txt", ".urls")
#: a compressed tar may expand to at most this many times its size, plus this many bytes
TAR_MAX_RATIO = 50
TAR_MAX_EXTRA = 1 << 30


@dataclass
class Source:
    """What a build reads: ``items[i]`` is read with :func:`explorer.stages.images.read_file`,
    ``rel[i]`` is its CSV ``path``, ``root`` is what run.json's ``image_dir`` names."""

    kind: str
    given: str
    root: Path
    items: list[Any] = field(default_factory=list)
    rel: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: a table input's own columns (``path`` = the CSV path, then ``label``, metadata)
    columns: pd.DataFrame | None = None


def kind_of(source: str | os.PathLike) -> str:
    """``"folder"``, ``"zip"``, ``"tar"`` (also compressed), ``"table"``, ``"urls"`` or
    ``"remote"`` (an fsspec URL such as ``s3://bucket/prefix``) for the build's positional
    argument; ``ValueError`` naming it when it is none of them."""
    text = os.fspath(source)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        raise ValueError(f"{text}: a single web address; put http(s) URLs in a text file, one "
                         "per line, and build that file")
    if scheme and scheme.replace("+", "").replace("-", "").isalnum():
        return "remote"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise ValueError(f"image folder or file not found: {text}")
    if not path.is_file():
        raise ValueError(f"{text} is neither a folder nor a file")
    kind = archives.archive_kind(path)
    if kind is not None:
        return "zip" if kind == "zip" else "tar"
    low = path.name.lower()
    if low.endswith(TABLE_SUFFIXES):
        return "table"
    if low.endswith(URL_LIST_SUFFIXES):
        return "urls"
    raise ValueError(f"{text}: not a folder, an archive ({', '.join(archives.ARCHIVE_SUFFIXES)}), "
                     f"a table ({', '.join(TABLE_SUFFIXES)}) or a URL list "
                     f"({', '.join(URL_LIST_SUFFIXES)})")


def open_source(source: str | os.PathLike, *, work_dir: Path, max_bytes: int | None = None,
                allow_private_urls: bool = False, console: Any = None,
                contained: bool = False) -> Source:
    """The items of ``source`` (see the module docstring). ``work_dir`` is where a kind that
    needs disk keeps it between runs (``NAME.sources/`` beside the CSV); ``max_bytes`` is the
    per-file cap; ``contained`` keeps only the files of a folder that resolve inside it (the
    service's builds, :func:`explorer.stages.images.discover`). Raises ``ValueError`` for a source that cannot be read at all; single bad
    items are error lines, never exceptions."""
    given = os.fspath(source)
    kind = kind_of(given)
    if kind == "folder":
        return _folder(given, contained)
    if kind in ("zip", "tar"):
        return _archive(given, work_dir, max_bytes)
    if kind == "table":
        return _table(given)
    if kind == "remote":
        return _remote(given, work_dir / "remote", max_bytes, console)
    from explorer.inputs import urlfetch

    urls, errors = urlfetch.read_url_list(given)
    folder = work_dir / "urls"
    files, rels, errs = urlfetch.fetch_to_cache(
        urls, folder, urlfetch.FetchRules(allow_private=allow_private_urls,
                                          max_bytes=max_bytes or urlfetch.FetchRules.max_bytes),
        console=console)
    return Source("urls", given, folder.resolve(), files, rels, errors + errs)


def _folder(given: str, contained: bool = False) -> Source:
    from explorer.stages import images

    root = Path(given).expanduser().resolve()
    found = images.discover(root, contained=contained)
    return Source("folder", given, root, found, [p.relative_to(root).as_posix() for p in found])


def _archive(given: str, work_dir: Path, max_bytes: int | None) -> Source:
    path = Path(given).expanduser().resolve()
    readable = path
    if archives.archive_kind(path) not in ("zip", "tar"):  # compressed tar: a plain copy
        cap = TAR_MAX_RATIO * path.stat().st_size + TAR_MAX_EXTRA
        readable = Path(archives.plain_tar(path, work_dir / "source.tar", max_total=cap))
    members, errors = archives.list_members(readable, max_bytes=max_bytes)
    return Source("archive", given, readable, list(members), [m.name for m in members], errors)


#: the remote cache's record of what each file was when it was copied
REMOTE_MANIFEST = "manifest.json"


def _remote(given: str, folder: Path, max_bytes: int | None, console: Any) -> Source:
    """The image files under an fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``,
    ``memory://`` ...), each copied once into ``folder`` under its path relative to the prefix;
    a re-run copies only files whose size or version (ETag, mtime) changed. Credentials and
    endpoints come from the filesystem's usual settings (``AWS_PROFILE``,
    ``AWS_ENDPOINT_URL`` ... for S3)."""
    import json

    from explorer.table import atomic_write_text

    try:
        import fsspec
    except ImportError:
        raise ValueError(f"reading {given} needs fsspec: pip install '.[cloud]'") from None
    try:
        fs, prefix = fsspec.core.url_to_fs(given)
        listing = fs.find(prefix, detail=True)
    except ImportError as exc:
        raise ValueError(f"reading {given} needs its filesystem package ({exc}); for s3:// "
                         "pip install '.[cloud]'") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot list {given}: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / REMOTE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text("utf-8")) if manifest_path.is_file() else {}
    except (OSError, ValueError):
        manifest = {}
    base = prefix.rstrip("/")
    wanted: list[tuple[str, str, dict]] = []
    errors: list[tuple[str, str]] = []
    for path in sorted(listing):
        info = listing[path]
        if info.get("type", "file") != "file":
            continue
        rel = path[len(base):].lstrip("/") if path.startswith(base) else path
        why = archives.unsafe_name(rel)
        if why is None and not archives.wanted_name(rel):
            continue
        size = int(info.get("size") or 0)
        if why is None and max_bytes is not None and size > max_bytes:
            why = archives.too_large(size, max_bytes)
        if why is not None:
            errors.append((rel, why))
            continue
        wanted.append((path, rel, info))
    from explorer.progress import track

    files, rels = [], []
    for path, rel, info in track(wanted, f"Copying from {given}", console is not None):
        version = [int(info.get("size") or 0),
                   str(info.get("ETag") or info.get("etag") or info.get("mtime")
                       or info.get("LastModified") or "")]
        dest = folder.joinpath(*rel.split("/"))
        if manifest.get(rel) != version or not dest.is_file():
            try:
                _copy_remote(fs, path, dest, max_bytes)
            except (OSError, ValueError) as exc:
                errors.append((rel, f"cannot copy ({exc})"))
                continue
            manifest[rel] = version
        files.append(dest.resolve())
        rels.append(rel)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=0, sort_keys=True))
    return Source("remote", given, folder.resolve(), files, rels, errors)


def _copy_remote(fs: Any, path: str, dest: Path, max_bytes: int | None) -> None:
    """Stream one remote file into ``dest`` (through a temporary name), never more than
    ``max_bytes`` whatever its listing said."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    total = 0
    try:
        with fs.open(path, "rb") as fi, open(tmp, "wb") as fo:
            while block := fi.read(1 << 20):
                total += len(block)
                if max_bytes is not None and total > max_bytes:
                    raise ValueError(archives.too_large(total, max_bytes))
                fo.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_table_input(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV or Parquet table with a ``path`` column, as text columns where they are text.
    A Hugging Face metadata file's ``file_name`` column is the path (its own ``path``
    column, if any, is kept as ``source_path``). ``ValueError`` names the file and the
    columns it has when neither is there."""
    p = Path(path)
    try:
        if p.name.lower().endswith((".parquet", ".pq")):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, dtype={"path": str, "label": str, HF_FILE_NAME: str},
                             keep_default_na=False)
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"cannot read the table {path}: {exc}") from None
    if HF_FILE_NAME in df.columns:
        df = df.rename(columns={"path": "source_path"}).rename(columns={HF_FILE_NAME: "path"})
    if "path" not in df.columns:
        raise ValueError(f"the table {path} has no 'path' column (it has: "
                         f"{', '.join(map(str, df.columns)) or 'none'})")
    return df


def _table_base(table_path: Path) -> Path:
    """The folder a table's relative paths start from: the image folder its run record
    names when the table is a build's ``NAME.csv`` (paths relative to that folder), else
    the table's own folder."""
    from explorer.paths import image_root_from_run
    from explorer.table import sidecar

    if sidecar(table_path, "run.json").is_file():
        root, _ = image_root_from_run(table_path)
        if root is not None and root.is_dir():
            return root
    return table_path.parent


def _table(given: str) -> Source:
    """The files a table names. Relative paths start from :func:`_table_base`; the root
    is the deepest folder holding every file (checked like any image root: never ``/`` or
    the home folder); files that are missing, not regular or not images are error lines."""
    from explorer.stages import images

    table_path = Path(given).expanduser().resolve()
    df = read_table_input(table_path)
    base = _table_base(table_path)
    errors: list[tuple[str, str]] = []
    files: list[Path] = []
    keep: list[int] = []
    seen: set[Path] = set()
    for i, value in enumerate(df["path"].tolist()):
        text = "" if value is None or (isinstance(value, float) and value != value) else str(value)
        if not text.strip():
            errors.append((f"(row {i + 2})", "empty path"))
            continue
        p = Path(text).expanduser()
        full = Path(os.path.realpath(p if p.is_absolute() else base / p))
        if not full.is_file():
            errors.append((text, "file not found" if not full.exists() else "not a file"))
            continue
        if full.suffix.lower().lstrip(".") not in images.IMAGE_EXTENSIONS:
            errors.append((text, "not an image file name"))
            continue
        if full in seen:
            errors.append((text, "named twice in the table; the first row is used"))
            continue
        seen.add(full)
        files.append(full)
        keep.append(i)
    if not files:
        return Source("table", given, base, [], [], errors)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    try:
        root = check_image_root(root)
    except UnsafePath as exc:
        raise ValueError(f"the files of {given} lie in {root}, which cannot be an image "
                         f"folder: {exc}") from None
    rel = [f.relative_to(root).as_posix() for f in files]
    cols = df.iloc[keep].reset_index(drop=True).copy()
    cols["path"] = rel
    return Source("table", given, root, files, rel, errors, cols)


def add_table_columns(df: pd.DataFrame, columns: pd.DataFrame) -> pd.DataFrame:
    """``df`` (a build's table) with a table input's ``label`` and other columns, matched by
    ``path``: ``label`` fills the schema's label column; the others are joined like
    ``--metadata`` (:func:`explorer.stages.metadata.join_metadata`: a name that clashes with a
    schema column becomes ``meta_<name>``). Rows are never dropped, added or reordered."""
    from explorer.stages.metadata import join_metadata

    out = df
    if "label" in columns.columns:
        labels = dict(zip(columns["path"].astype(str), columns["label"]))
        out = out.copy()
        out["label"] = [("" if pd.isna(v := labels.get(p, "")) else str(v))
                        for p in out["path"].astype(str)]
    rest = columns.drop(columns=[c for c in ("label",) if c in columns.columns])
    if len(rest.columns) > 1:
        out, _ = join_metadata(out, rest, "path")
    return out


# --------------------------------------------------------------------------- --vectors
#: the column of a Parquet vectors file that holds one list per row (else: every numeric
#: column but ``path`` is a dimension)
VECTOR_COLUMNS = ("vector", "embedding", "embeddings", "features")


def paths_file_of(npy: str | os.PathLike) -> Path:
    """The file that keys the rows of ``FILE.npy``: ``FILE.paths.txt`` beside it, one path
    per line, in row order (the one naming rule)."""
    p = Path(npy)
    return p.with_name(p.name[: -len(p.suffix)] + ".paths.txt")


def read_vectors(path: str | os.PathLike) -> tuple[list[str], "np.ndarray"]:
    """Your own embeddings: ``(keys, vectors)``, one key (a path) per row.

    * ``FILE.npy``: an (N, D) array, its keys in :func:`paths_file_of` (``FILE.paths.txt``);
    * ``FILE.parquet``: a ``path`` column and either a list column (:data:`VECTOR_COLUMNS`)
      or numeric columns, one per dimension.

    Raises ``ValueError`` naming the file for a wrong shape, a count mismatch, missing keys,
    repeated keys or values that are not finite numbers.
    """
    import numpy as np

    p = Path(path)
    low = p.name.lower()
    try:
        if low.endswith(".npy"):
            vecs = np.load(p, allow_pickle=False)
            keys_file = paths_file_of(p)
            if not keys_file.is_file():
                raise ValueError(f"{p} needs its row keys in {keys_file.name} beside it (one "
                                 "path per line, in row order)")
            keys = [k for k in keys_file.read_text(encoding="utf-8").splitlines()]
            while keys and not keys[-1].strip():
                keys.pop()
        elif low.endswith((".parquet", ".pq")):
            df = pd.read_parquet(p)
            if "path" not in df.columns:
                raise ValueError(f"{p} has no 'path' column (it has: "
                                 f"{', '.join(map(str, df.columns))})")
            keys = df["path"].astype(str).tolist()
            listcol = next((c for c in VECTOR_COLUMNS if c in df.columns), None)
            if listcol is not None:
                vecs = np.stack([np.asarray(v, np.float32) for v in df[listcol]]) if len(df) \
                    else np.zeros((0, 0), np.float32)
            else:
                num = df.drop(columns=["path"]).select_dtypes("number")
                if num.shape[1] == 0:
                    raise ValueError(f"{p} has no vector column ({', '.join(VECTOR_COLUMNS)}) "
                                     "and no numeric columns")
                vecs = num.to_numpy(np.float32)
        else:
            raise ValueError(f"--vectors {p}: expected FILE.npy (+ FILE.paths.txt) or "
                             "FILE.parquet")
    except (OSError, ImportError) as exc:
        raise ValueError(f"cannot read --vectors {p}: {exc}") from None
    vecs = np.asarray(vecs)
    if vecs.ndim != 2 or vecs.shape[1] == 0:
        raise ValueError(f"--vectors {p}: expected an (N, D) array, got shape {vecs.shape}")
    if not np.issubdtype(vecs.dtype, np.number):
        raise ValueError(f"--vectors {p}: values of type {vecs.dtype} are not numbers")
    vecs = vecs.astype(np.float32, copy=False)
    if len(keys) != len(vecs):
        raise ValueError(f"--vectors {p}: {len(vecs)} rows but {len(keys)} paths")
    if not np.isfinite(vecs).all():
        bad = int((~np.isfinite(vecs)).any(axis=1).sum())
        raise ValueError(f"--vectors {p}: {bad} rows hold NaN or infinite values")
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"--vectors {p}: the path {k!r} has two rows")
        seen.add(k)
    return keys, vecs


def match_vectors(keys: list[str], rel: list[str], items: list[Any]) -> "np.ndarray":
    """For each item, the row of ``keys`` that names it, or -1. A key names an item when it
    equals its CSV path (``rel``), its full path (also a relative key resolved against the
    current folder), or, failing those, its file name when only one item has that name."""
    import numpy as np

    pos = {k.replace("\\", "/"): i for i, k in enumerate(keys)}
    full = {}
    for i, k in enumerate(keys):
        if "!/" not in k:
            full.setdefault(os.path.realpath(k), i)
        else:
            full.setdefault(k, i)
    names: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        names.setdefault(k.replace("\\", "/").rsplit("/", 1)[-1], []).append(i)
    item_names: dict[str, int] = {}
    for r in rel:
        n = r.rsplit("/", 1)[-1]
        item_names[n] = item_names.get(n, 0) + 1
    out = np.full(len(rel), -1, np.int64)
    for j, (r, item) in enumerate(zip(rel, items)):
        if r in pos:
            out[j] = pos[r]
            continue
        f = full.get(os.fspath(item))
        if f is not None:
            out[j] = f
            continue
        n = r.rsplit("/", 1)[-1]
        cand = names.get(n, [])
        if len(cand) == 1 and item_names[n] == 1:
            out[j] = cand[0]
    return out
