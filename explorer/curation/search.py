"""Find images in a build by words or by an example image.

``search(build, text=..., image=..., top=10)`` (``build``: ``explorer.open("NAME.csv")`` or
the CSV's path) returns a ranked list of dicts with at
least ``path`` and ``score`` (plus ``index``, the CSV row, ``image``, ``cluster`` and, for
concept search, ``concepts``), the same list ``explorer search --json`` prints.

Three ways, none needs the network:

- **search by concept** (the default for text): the bundled sentence model
  all-MiniLM-L6-v2 reads the query and the 1,000 ImageNet class names; each image is scored
  by the backbone's class probabilities for the classes the query matches. The top classes
  per image are stored at build time in ``NAME.concepts.npz`` (made from
  ``NAME.features.npy`` here when missing), so nothing is embedded again. It cannot find
  what ImageNet has no class for (a person, a face, a colour alone, an action).
- **CLIP** (``text_model=`` an open_clip model name or a JSON config file, ``checkpoint=``
  its weights on disk): the query and the images are embedded by that model; the image
  vectors are cached in ``NAME.clip/``.
- **by image** (``image=FILE``): FILE is embedded through the build's own path and model
  key (:meth:`explorer.dataset.Build.embed`: same model, precision, runtime and
  preprocessing as ``NAME.run.json`` records) and its nearest neighbours among the stored
  features are returned, through :func:`explorer.stages.neighbours.nearest`, the app's "look
  around" index. An image of the build finds its own row first, at cosine ~1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from explorer.stages import concepts as C
from explorer import dataset, table
from explorer._checks import check_int
from explorer.paths import user_cache_dir

if TYPE_CHECKING:
    from explorer.dataset import Build


class SearchError(ValueError):
    """The search cannot run (no query, missing sidecars, bad parameters)."""


# --------------------------------------------------------------------------- build files
def load_features(build: "Build | str | os.PathLike") -> np.ndarray:
    """The build's stored embedding matrix (``NAME.features.npy``), one row per CSV row."""
    try:
        return dataset.open(build).vectors
    except dataset.BuildFileError as exc:
        raise SearchError(str(exc)) from exc


def _build_model(run: dict) -> tuple[str | None, str | None]:
    params = run.get("parameters") or {}
    model = (run.get("model") or {}).get("name") or params.get("model")
    return model, params.get("checkpoint")


def concepts_for(build: "Build | str | os.PathLike", n_rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, p)`` top ImageNet classes per row: ``NAME.concepts.npz``, or computed from
    ``NAME.features.npy`` with the build's classifier (and saved) when it is missing."""
    build = dataset.open(build)
    path = build.file("concepts.npz")
    got = build.concepts()
    if got is not None:
        idx, p = got
    else:
        feats = load_features(build)
        model, ckpt = _build_model(build.run)
        try:
            idx, p = C.concepts_from_features(np.asarray(feats, np.float32), model, ckpt)
        except ValueError as exc:
            raise SearchError(f"search by concept needs ImageNet class probabilities: {exc}"
                              ) from exc
        C.save_concepts(path, idx, p)
    if n_rows is not None and len(idx) != n_rows:
        raise SearchError(f"{path.name} has {len(idx)} rows but the CSV {n_rows}; "
                          "rebuild to bring them in step")
    return idx, p


def class_vectors(cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """MiniLM vectors of the ImageNet class names, kept in a per-user cache file (encoding
    1,000 names costs seconds; reading them back milliseconds)."""
    import hashlib

    weights = C.minilm_path() / "model.safetensors"
    key = f"{C.CLASS_PROMPT}|{weights.stat().st_size}"
    name = "minilm-imagenet-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + ".npy"
    path = Path(cache_dir) if cache_dir is not None else user_cache_dir()
    path = path / name
    try:
        arr = np.load(path, allow_pickle=False)
        if arr.shape[0] == len(C.class_descriptions()):
            return arr
    except (OSError, ValueError):
        pass
    arr = C.class_text_embeddings()
    try:
        import io

        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, arr)
        table.atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # a read-only home: recompute next time
    return arr


# --------------------------------------------------------------------------- rankings
def rank(scores: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` highest scores, best first (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    top = min(int(top), len(scores))
    if top <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((np.arange(len(scores)), -scores))[:top].astype(np.int64)


def query_scores(query: str, idx: np.ndarray, p: np.ndarray,
                 class_vecs: np.ndarray | None = None, encoder=None
                 ) -> tuple[np.ndarray, list[str]]:
    """Search-by-concept score of every row for ``query`` and the classes it was read as."""
    if class_vecs is None:
        class_vecs = C.class_text_embeddings()
    enc = encoder or C.text_encoder()
    w = C.query_class_weights(enc.encode([str(query)])[0], class_vecs)
    return C.concept_scores(idx, p, w), C.matching_classes(w)


def concept_search(query: str, idx: np.ndarray, p: np.ndarray, top: int = 10,
                   class_vecs: np.ndarray | None = None, encoder=None
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pure core of search by concept: ``(rows, scores, classes the query was read as)``."""
    scores, read_as = query_scores(query, idx, p, class_vecs, encoder)
    rows = rank(scores, top)
    return rows, scores[rows], read_as


def image_search(features: np.ndarray, query_vec: np.ndarray, top: int = 10
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest stored rows to ``query_vec`` by cosine: ``(rows, similarity)``, through
    :func:`explorer.stages.neighbours.nearest` (the query is appended as one more row)."""
    from explorer.stages.neighbours import nearest

    X = np.asarray(features, dtype=np.float32)
    q = np.asarray(query_vec, dtype=np.float32).reshape(1, -1)
    if X.ndim != 2 or q.shape[1] != X.shape[1]:
        raise SearchError(f"the query vector has {q.shape[1]} values, the stored features "
                          f"{X.shape[1] if X.ndim == 2 else X.shape}; was FILE embedded "
                          "with the build's model?")
    idx, dist = nearest(np.vstack([X, q]), len(X), k=min(int(top), len(X)))
    return idx, 1.0 - dist


# --------------------------------------------------------------------------- CLIP
def load_clip(text_model: str, checkpoint: str | os.PathLike):
    """``(model, preprocess, tokenizer)`` of an open_clip model with local weights.

    ``text_model``: an open_clip model name (``ViT-B-32``...) or a path to a model config
    JSON (its file stem becomes the name). Never downloads: ``checkpoint`` must be a file.
    """
    import open_clip

    if checkpoint is None or not Path(checkpoint).is_file():
        raise SearchError(f"CLIP search needs --checkpoint pointing to the weights of "
                          f"{text_model!r} on disk, got {checkpoint!r}")
    name = str(text_model)
    if name.endswith(".json"):
        cfg = Path(name)
        if not cfg.is_file():
            raise SearchError(f"CLIP model config not found: {name!r}")
        open_clip.add_model_config(cfg)
        name = cfg.stem
    if name not in open_clip.list_models():
        raise SearchError(f"unknown open_clip model {text_model!r} (a name from "
                          "open_clip.list_models() or a config .json)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(checkpoint), load_weights=True)
    except Exception as exc:  # open_clip raises RuntimeError/KeyError on a bad checkpoint
        raise SearchError(f"cannot load CLIP weights {str(checkpoint)!r} for {name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def clip_text(model, tokenizer, texts: list[str]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        v = model.encode_text(tokenizer(texts)).float()
        return torch.nn.functional.normalize(v, dim=-1).numpy()


def clip_images(model, preprocess, images, batch_size: int = 32) -> np.ndarray:
    """Unit CLIP vectors of PIL images."""
    import torch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im.convert("RGB")) for im in images[lo:lo + batch_size]])
            out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _row_image(build: "Build", i: int):
    """The thumbnail of CSV row ``i`` (the app's copy), else the original image; both paths
    through :mod:`explorer.paths` (the run record and the CSV are untrusted input)."""
    from PIL import Image

    from explorer.stages import images as images_mod
    from explorer import paths as paths_mod

    df, run = build.table, build.run
    thumb = str(df["image"].iloc[i]) if "image" in df.columns else ""
    app = run.get("app")
    if isinstance(app, str) and app and thumb:
        try:
            p = paths_mod.resolve_under(app, thumb, must_be_image=True)
            with Image.open(p) as im:
                return im.convert("RGB")
        except (OSError, ValueError):
            pass  # no usable thumbnail: the original
    try:
        root = paths_mod.require_image_root(build.csv_path, run or None)
        p = paths_mod.resolve_under(root, str(df["path"].iloc[i]), must_be_image=True)
        img, _ = images_mod.load_image(p, 256)
    except (OSError, ValueError) as exc:
        raise SearchError(f"cannot open the image of row {i} ({df['path'].iloc[i]}) for CLIP: "
                          f"{exc}") from exc
    return img.convert("RGB")


def clip_image_vectors(build: "Build", model, preprocess, key: str,
                       progress: bool = False) -> np.ndarray:
    """CLIP vectors of every row, cached in ``NAME.clip/`` under ``key``."""
    from explorer.stages.features import FeatureCache, feature_key
    from explorer.progress import track

    df = build.table
    cache = FeatureCache(build.file("clip"))
    k = feature_key("clip", df["path"].astype(str).tolist(), {"model": key})

    def compute():
        vecs = []
        rows = list(range(len(df)))
        for lo in track(range(0, len(rows), 64), "CLIP images", progress,
                        total=(len(rows) + 63) // 64):
            vecs.append(clip_images(model, preprocess,
                                    [_row_image(build, i) for i in rows[lo:lo + 64]]))
        return np.concatenate(vecs).astype(np.float32)

    return cache.get_or_compute(k, compute)[0]


# --------------------------------------------------------------------------- entry point
def search(build: "Build | str | os.PathLike", text: str | None = None,
           image: str | os.PathLike | None = None, top: int = 10, *,
           text_model: str | None = None, checkpoint: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None, progress: bool = False
           ) -> list[dict[str, Any]]:
    """Rank the images of a build for a text query or an example image (one of the two).

    Returns up to ``top`` dicts, best first: ``path``, ``score`` (higher = better; concept
    scores are probabilities in [0, 1], CLIP and image scores cosine similarities),
    ``index`` (CSV row), ``image``, ``cluster`` and, for concept search, ``concepts`` (the
    image's top ImageNet classes) and ``query_read_as`` (the classes the query matched).
    ``build``: an opened build (:func:`explorer.open`) or the path of its CSV.
    Raises :class:`SearchError` (a ``ValueError``) for anything the user can fix.
    """
    if (text is None or not str(text).strip()) == (image is None):
        raise SearchError("give either a text query or --image FILE (exactly one)")
    top = check_int("top", top, 1, error=SearchError)
    if text_model is not None and image is not None:
        raise SearchError("--text-model is for text queries; --image uses the build's model")
    build = dataset.open(build)
    df = build.table
    extra: list[dict[str, Any]] = [{} for _ in range(len(df))]
    if image is not None:
        rows, scores = _by_image(build, Path(image), top)
    elif text_model is not None:
        model, preprocess, tok = load_clip(text_model, checkpoint)
        from explorer.stages.embed import file_digest

        key = f"{text_model}|{file_digest(checkpoint)}"
        V = clip_image_vectors(build, model, preprocess, key, progress)
        scores_all = V @ clip_text(model, tok, [str(text)])[0]
        rows = rank(scores_all, top)
        scores = scores_all[rows]
    else:
        idx, p = concepts_for(build, len(df))
        rows, scores, read_as = concept_search(str(text), idx, p, top, class_vectors(cache_dir))
        names = C.class_names()
        for r in rows:
            extra[r] = {"concepts": [names[int(c)] for c in idx[r][:3]],
                        "query_read_as": read_as}
    out = []
    for r, s in zip(rows, scores):
        r = int(r)
        hit = {"path": str(df["path"].iloc[r]), "score": round(float(s), 6), "index": r,
               "image": str(df["image"].iloc[r]) if "image" in df.columns else "",
               "cluster": int(df["cluster"].iloc[r]) if "cluster" in df.columns else -1}
        if "cluster_name" in df.columns:
            hit["cluster_name"] = str(df["cluster_name"].iloc[r])
        hit.update(extra[r])
        out.append(hit)
    return out


def image_vectors(build: "Build | str | os.PathLike", images) -> np.ndarray:
    """Query vectors of image files, made the way the build made its own (its model key:
    :meth:`explorer.dataset.Build.embed`), one row per file."""
    build = dataset.open(build)
    if (build.parameters.get("method") or "timm") != "timm":
        raise SearchError("search by image needs a build with the CNN (--method timm); "
                          f"{build.csv_path.name} was built with another method")
    images = [Path(p) for p in images]
    for p in images:
        if not p.is_file():
            raise SearchError(f"image not found: {str(p)!r}")
    try:
        res = build.embed(images)
    except ValueError as exc:
        raise SearchError(str(exc)) from exc
    if res.errors:
        path, why = res.errors[0]
        raise SearchError(f"cannot read {path!r} as an image: {why}")
    return res.embeddings


def _by_image(build: "Build", image: Path, top: int):
    if not image.is_file():
        raise SearchError(f"image not found: {str(image)!r}")
    feats = load_features(build)
    return image_search(feats, image_vectors(build, [image])[0], top)
