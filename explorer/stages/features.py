"""Feature options that fit the collection: ``--features auto|cnn|pixels|hog|autoencoder``.

An ImageNet CNN is a good lens on photographs and a poor one on glyphs, icons, scanned pages
or line art, where plain downsampled pixels or HOG separate the classes far better. This
module computes the other candidates from the decoded thumbnails the build already has
(uint8 arrays or PIL images, any size) and picks among them without labels:

- :func:`pixel_features`   a small grey or colour thumbnail, flattened, PCA-reduced;
- :func:`hog_features`     scikit-image's histogram of oriented gradients, PCA-reduced;
- :func:`autoencoder_features`  the bottleneck of a small convolutional autoencoder trained
  on the collection itself (loss ``mse``, ``l1`` or ``perceptual`` = distance between the
  early feature maps of the CNN backbone), deterministic for a seed;
- :func:`choose_features`  scores each candidate's clusterable structure (the same UMAP
  space + HDBSCAN the build uses, on a sample) with an unsupervised score and returns the
  winner, every candidate's score and the reason, for the run record.

All functions are pure (arrays in, arrays out). :class:`FeatureCache` is the one piece that
touches disk: a sidecar folder of ``.npy`` files keyed by the collection's content hashes and
the parameters (:func:`feature_key`), so a re-run does not retrain the autoencoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from explorer._checks import check_int

#: values of ``--features``
FEATURES: tuple[str, ...] = ("auto", "cnn", "pixels", "hog", "autoencoder")
#: the candidates ``auto`` computes and scores (the autoencoder trains: not cheap)
AUTO_CANDIDATES: tuple[str, ...] = ("cnn", "pixels", "hog")
#: values of ``--ae-loss``
AE_LOSSES: tuple[str, ...] = ("mse", "l1", "perceptual")
#: unsupervised scores :func:`choose_features` knows
SCORES: tuple[str, ...] = ("silhouette", "dbcv")

PIXEL_DEFAULTS: dict[str, Any] = {"size": 24, "grey": False, "n_components": 64}
HOG_DEFAULTS: dict[str, Any] = {"size": 64, "orientations": 9, "pixels_per_cell": 8,
                                "cells_per_block": 2, "n_components": 64}
AE_DEFAULTS: dict[str, Any] = {"size": 32, "latent": 32, "loss": "mse", "epochs": 30,
                               "batch_size": 64, "lr": 2e-3}
#: points :func:`choose_features` scores (a random sample of larger collections)
CHOICE_SAMPLE = 1000
#: below this many images ``auto`` keeps the CNN (too few points to judge structure by)
AUTO_MIN_IMAGES = 200
#: the side of the small images the pipeline hands to the pixel/HOG/autoencoder options
SMALL_SIZE = 64
#: a candidate must beat ``cnn`` by more than this in score to replace it (a tie keeps the
#: CNN). Measured (bench/quality.py, silhouette): clothing photos cnn 0.464 vs pixels 0.321 /
#: hog 0.311; generated non-photographs cnn 0.718 vs hog 0.498; aligned digits hog 0.559 vs
#: cnn 0.542, where hog is the better choice (NMI 0.91 vs 0.80): a margin of 0.05 kept the
#: CNN there, so the margin only absorbs sampling noise
CNN_MARGIN = 0.01


class FeatureError(ValueError):
    """Bad feature parameters or images the features cannot be computed from."""


# --------------------------------------------------------------------------- inputs
def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise FeatureError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_int(name, value, minimum, error=FeatureError)


def to_array(img, size: int, grey: bool = False) -> np.ndarray:
    """One image (PIL or uint8 HxW / HxWx3 / HxWx4 array) as float32 in [0, 1], squashed to
    ``size`` x ``size``; ``(size, size)`` when ``grey`` else ``(size, size, 3)``."""
    from PIL import Image

    if isinstance(img, Image.Image):
        pil = img
    else:
        a = np.asarray(img)
        if a.ndim not in (2, 3) or a.shape[0] == 0 or a.shape[1] == 0:
            raise FeatureError(f"an image must be an HxW or HxWxC array, got shape {a.shape}")
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = a * 255.0
            a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        pil = Image.fromarray(a[..., :3] if a.ndim == 3 else a)
    pil = pil.convert("L" if grey else "RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(pil, dtype=np.float32) / 255.0


def stack(images, size: int, grey: bool = False) -> np.ndarray:
    """Many images as one float32 array ``(n, size, size[, 3])`` in [0, 1]."""
    images = list(images)
    if not images:
        raise FeatureError("no images to compute features from")
    shape = (len(images), size, size) if grey else (len(images), size, size, 3)
    out = np.empty(shape, dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = to_array(img, size, grey)
    return out


def pca(X: np.ndarray, n_components: int | None, seed: int = 0) -> np.ndarray:
    """Rows projected on their top principal components (all of them when fewer rows)."""
    X = np.asarray(X, dtype=np.float32)
    if n_components is None:
        return X
    k = min(int(n_components), X.shape[0] - 1, X.shape[1])
    if k < 1:
        return X - X.mean(axis=0, keepdims=True)
    from sklearn.decomposition import PCA

    solver = "randomized" if k < 0.8 * min(X.shape) else "full"
    return PCA(n_components=k, svd_solver=solver, random_state=seed).fit_transform(X).astype(
        np.float32)


# --------------------------------------------------------------------------- candidates
def pixel_features(images, *, size: int = PIXEL_DEFAULTS["size"],
                   grey: bool = PIXEL_DEFAULTS["grey"],
                   n_components: int | None = PIXEL_DEFAULTS["n_components"],
                   seed: int = 0) -> np.ndarray:
    """``pixels``: each image squashed to ``size`` x ``size`` (grey or colour), flattened,
    PCA-reduced to ``n_components`` (``None``: no PCA). Returns float32 ``(n, k)``."""
    size = _check_int("size", size, 4)
    if n_components is not None:
        _check_int("n_components", n_components, 1)
    A = stack(images, size, grey)
    return pca(A.reshape(len(A), -1), n_components, seed)


def hog_features(images, *, size: int = HOG_DEFAULTS["size"],
                 orientations: int = HOG_DEFAULTS["orientations"],
                 pixels_per_cell: int = HOG_DEFAULTS["pixels_per_cell"],
                 cells_per_block: int = HOG_DEFAULTS["cells_per_block"],
                 n_components: int | None = HOG_DEFAULTS["n_components"],
                 seed: int = 0) -> np.ndarray:
    """``hog``: scikit-image HOG of each grey image squashed to ``size`` x ``size``,
    PCA-reduced to ``n_components`` (``None``: no PCA). Returns float32 ``(n, k)``."""
    from skimage.feature import hog

    size = _check_int("size", size, 8)
    _check_int("orientations", orientations, 1)
    _check_int("pixels_per_cell", pixels_per_cell, 2)
    _check_int("cells_per_block", cells_per_block, 1)
    if size < pixels_per_cell * cells_per_block:
        raise FeatureError(f"size {size} is smaller than one HOG block "
                           f"({pixels_per_cell} x {cells_per_block} pixels)")
    if n_components is not None:
        _check_int("n_components", n_components, 1)
    images = list(images)
    if not images:
        raise FeatureError("no images to compute features from")
    rows = [hog(to_array(im, size, grey=True), orientations=orientations,
                pixels_per_cell=(pixels_per_cell, pixels_per_cell),
                cells_per_block=(cells_per_block, cells_per_block), block_norm="L2-Hys",
                feature_vector=True).astype(np.float32) for im in images]
    return pca(np.stack(rows), n_components, seed)


# --------------------------------------------------------------------------- autoencoder
def _ae_modules(size: int, latent: int):
    import torch.nn as nn

    ch = (16, 32, 64)
    n_down = 3
    s = size // (2 ** n_down)

    enc = nn.Sequential(
        nn.Conv2d(3, ch[0], 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(ch[0], ch[1], 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(ch[1], ch[2], 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(ch[2] * s * s, latent),
    )
    dec = nn.Sequential(
        nn.Linear(latent, ch[2] * s * s), nn.ReLU(), nn.Unflatten(1, (ch[2], s, s)),
        nn.ConvTranspose2d(ch[2], ch[1], 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(ch[1], ch[0], 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(ch[0], 3, 4, stride=2, padding=1), nn.Sigmoid(),
    )
    return enc, dec


def perceptual_layers(backbone=None, n_blocks: int = 2):
    """The early layers (stem + the first ``n_blocks`` stages) of the CNN backbone, frozen,
    as one module taking images in [0, 1]; ``backbone`` defaults to the bundled lite0."""
    import torch
    import torch.nn as nn

    if backbone is None:
        from explorer.stages.embed import load_model

        backbone, _ = load_model()
    parts = [backbone.conv_stem, backbone.bn1, *list(backbone.blocks)[:n_blocks]]
    body = nn.Sequential(*parts).eval()
    for p in body.parameters():
        p.requires_grad_(False)

    class _Early(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body((x - 0.5) / 0.5)

    return _Early()


def autoencoder_features(images, *, size: int = AE_DEFAULTS["size"],
                         latent: int = AE_DEFAULTS["latent"], loss: str = AE_DEFAULTS["loss"],
                         epochs: int = AE_DEFAULTS["epochs"],
                         batch_size: int = AE_DEFAULTS["batch_size"],
                         lr: float = AE_DEFAULTS["lr"], seed: int = 0, perceptual=None,
                         progress: bool = False, history: list | None = None) -> np.ndarray:
    """``autoencoder``: train a small convolutional autoencoder on these images and return
    each image's ``latent``-d bottleneck (float32 ``(n, latent)``).

    ``loss``: ``mse`` / ``l1`` on pixels, or ``perceptual``: mean squared distance between
    the early feature maps of the CNN backbone (``perceptual``: a module from
    :func:`perceptual_layers`; built from the bundled lite0 when None) plus a small pixel
    MSE term. Deterministic for a ``seed`` on CPU (one torch thread order, seeded shuffles).
    ``history``, when given, receives the mean training loss of each epoch.
    """
    import torch

    size = _check_int("size", size, 8)
    if size % 8:
        raise FeatureError(f"size must be a multiple of 8, got {size}")
    latent = _check_int("latent", latent, 2)
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_choice("loss", loss, AE_LOSSES)
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise FeatureError(f"lr must be in (0, 1), got {lr!r}")
    A = stack(images, size)  # (n, s, s, 3)
    X = torch.from_numpy(np.ascontiguousarray(A.transpose(0, 3, 1, 2)))

    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        enc, dec = _ae_modules(size, latent)
    if loss == "perceptual" and perceptual is None:
        perceptual = perceptual_layers()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    n = len(X)

    def loss_fn(out, x):
        if loss == "mse":
            return torch.mean((out - x) ** 2)
        if loss == "l1":
            return torch.mean(torch.abs(out - x))
        return torch.mean((perceptual(out) - perceptual(x)) ** 2) + torch.mean((out - x) ** 2)

    from explorer.progress import track

    enc.train()
    dec.train()
    for _ in track(range(epochs), f"Autoencoder ({loss})", progress, total=epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for lo in range(0, n, batch_size):
            xb = X[order[lo:lo + batch_size]]
            out = dec(enc(xb))
            value = loss_fn(out, xb)
            opt.zero_grad()
            value.backward()
            opt.step()
            total += float(value.detach()) * len(xb)
        if history is not None:
            history.append(total / n)
    enc.eval()
    with torch.no_grad():
        Z = torch.cat([enc(X[lo:lo + 256]) for lo in range(0, n, 256)])
    return Z.numpy().astype(np.float32)


# --------------------------------------------------------------------------- cache
def feature_key(name: str, hashes: Sequence[str], params: Mapping[str, Any]) -> str:
    """Cache key of ``name`` features of a collection: its content hashes (in order) and the
    parameters that shape the vectors."""
    h = hashlib.blake2b(digest_size=16)
    h.update(name.encode())
    h.update(json.dumps(dict(params), sort_keys=True, default=str).encode())
    for x in hashes:
        h.update(str(x).encode())
        h.update(b"\n")
    return f"{name}-{h.hexdigest()}"


class FeatureCache:
    """A folder of ``KEY.npy`` arrays and ``KEY.json`` values (a build's ``NAME.features/``
    sidecar: autoencoder vectors, auto's feature choice)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, key: str, suffix: str = ".npy") -> Path:
        return self.directory / f"{key}{suffix}"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, key: str, arr: np.ndarray) -> Path:
        import io

        from explorer.table import atomic_write_bytes

        self.directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(arr))
        return atomic_write_bytes(self.path(key), buf.getvalue())

    def get_json(self, key: str) -> Any:
        """The JSON value stored under ``key`` (``KEY.json``), or ``None``."""
        p = self.path(key, ".json")
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put_json(self, key: str, value: Any) -> Path:
        from explorer.table import atomic_write_text

        self.directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.path(key, ".json"), json.dumps(value, sort_keys=True))

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """``(array, from_cache)``."""
        hit = self.get(key)
        if hit is not None:
            return hit, True
        arr = compute()
        self.put(key, arr)
        return arr, False


def compute(name: str, images, *, seed: int = 0, ae_loss: str = "mse", hashes=None,
            cache: FeatureCache | None = None, progress: bool = False,
            **params) -> np.ndarray:
    """Features ``name`` (``pixels``, ``hog`` or ``autoencoder``) of ``images``.

    With ``cache`` and ``hashes`` (one content hash per image) the autoencoder's vectors are
    read from / written to the cache (the cheap options are recomputed: faster than a read).
    """
    _check_choice("features", name, ("pixels", "hog", "autoencoder"))
    if name == "pixels":
        return pixel_features(images, seed=seed, **params)
    if name == "hog":
        return hog_features(images, seed=seed, **params)
    p = {**AE_DEFAULTS, **params, "loss": ae_loss}
    run = lambda: autoencoder_features(images, seed=seed, progress=progress, **p)  # noqa: E731
    if cache is None or hashes is None:
        return run()
    key = feature_key("autoencoder", hashes, {**p, "seed": seed})
    return cache.get_or_compute(key, run)[0]


# --------------------------------------------------------------------------- choice
@dataclass
class FeatureChoice:
    """What :func:`choose_features` decided, for the run record."""

    name: str
    scores: dict[str, float]
    reason: str
    score: str = "silhouette"
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    sample: int = 0
    seconds: float = 0.0
    #: True when the choice was read from the cache (scored on an earlier build of the same
    #: images with the same parameters), not scored again
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureChoice":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def _subsample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def structure_score(Z: np.ndarray, labels: np.ndarray, score: str = "silhouette",
                    seed: int = 0) -> float:
    """How clearly ``labels`` split the clusterable space ``Z``, penalised by noise.

    ``silhouette``: silhouette of the clustered points times the clustered share;
    ``dbcv``: density-based cluster validity (hdbscan.validity, noise counts against it).
    Fewer than two clusters scores -1.
    """
    _check_choice("score", score, SCORES)
    labels = np.asarray(labels)
    keep = labels >= 0
    if len(set(labels[keep].tolist())) < 2:
        return -1.0
    if score == "silhouette":
        from sklearn.metrics import silhouette_score

        s = float(silhouette_score(Z[keep], labels[keep], sample_size=min(int(keep.sum()), 2000),
                                   random_state=seed))
        return s * float(keep.mean())
    from hdbscan.validity import validity_index

    with np.errstate(all="ignore"):
        v = validity_index(np.asarray(Z, dtype=np.float64), labels.astype(np.intp))
    return float(v) if np.isfinite(v) else -1.0


def choose_features(candidates: Mapping[str, np.ndarray], *, score: str = "silhouette",
                    sample: int = CHOICE_SAMPLE, seed: int = 0, prefer: str | None = "cnn",
                    margin: float = CNN_MARGIN, progress: bool = False) -> FeatureChoice:
    """Pick the candidate feature matrix whose clusterable space has the clearest structure.

    Each candidate (same rows, any width) goes through the build's own clustering path on
    the same random ``sample`` of rows: :func:`explorer.stages.reduce.reduce_cluster_space`, then
    HDBSCAN (:func:`explorer.stages.cluster.cluster`), and is scored by :func:`structure_score`.
    The highest score wins, except that ``prefer`` (the CNN: photos) is kept unless another
    candidate beats it by more than ``margin``. Returns a :class:`FeatureChoice` naming the
    winner with every score and the reason.
    """
    from explorer.stages.cluster import cluster
    from explorer.stages.reduce import reduce_cluster_space

    _check_choice("score", score, SCORES)
    sample = _check_int("sample", sample, 10)
    if not candidates:
        raise FeatureError("choose_features needs at least one candidate")
    n = {len(np.asarray(X)) for X in candidates.values()}
    if len(n) != 1:
        raise FeatureError(f"candidates must have the same number of rows, got {sorted(n)}")
    n_rows = n.pop()
    t0 = time.perf_counter()
    idx = _subsample(n_rows, sample, seed)
    scores: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    for name, X in candidates.items():
        t1 = time.perf_counter()
        Xs = np.asarray(X, dtype=np.float32)[idx]
        Z, _ = reduce_cluster_space(Xs, random_state=seed, progress=progress)
        # HDBSCAN's own clusters (the build then assigns its noise; score what it found)
        raw = np.asarray(cluster(Z, "hdbscan", random_state=seed, assign_noise=False).labels)
        scores[name] = round(structure_score(Z, raw, score, seed), 4)
        details[name] = {"clusters": int(len(set(raw.tolist()) - {-1})),
                         "noise": round(float((raw < 0).mean()), 4),
                         "seconds": round(time.perf_counter() - t1, 2)}
    best = max(scores, key=lambda k: scores[k])
    winner = best
    if prefer in scores and best != prefer and scores[best] - scores[prefer] <= margin:
        winner = prefer
    others = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != winner)
    if winner == best:
        reason = (f"{winner} has the clearest cluster structure ({score} {scores[winner]:.3f}, "
                  f"{details[winner]['clusters']} clusters) vs {others or 'no other candidate'}")
    else:
        reason = (f"{winner} kept: {best} scores {scores[best]:.3f} vs {scores[winner]:.3f}, "
                  f"not more than the margin {margin} better ({others})")
    return FeatureChoice(winner, scores, reason, score, details, int(len(idx)),
                         round(time.perf_counter() - t0, 2))


#: part of :func:`choice_key`: bump when the way ``auto`` scores candidates changes, so
#: choices cached by an older version are scored again
CHOICE_VERSION = 2


def choice_key(hashes: Sequence[str], *, seed: int = 0, model: str | None = None,
               score: str = "silhouette", sample: int = CHOICE_SAMPLE,
               margin: float = CNN_MARGIN) -> str:
    """Cache key of ``auto``'s choice for a collection: its content hashes (in order), the
    CNN (``model``: the embedding's model key) and everything that shapes the scores."""
    params = {"seed": seed, "model": model, "score": score, "sample": sample,
              "margin": margin, "candidates": list(AUTO_CANDIDATES), "pixels": PIXEL_DEFAULTS,
              "hog": HOG_DEFAULTS, "small": SMALL_SIZE, "version": CHOICE_VERSION}
    return feature_key("auto-choice", hashes, params)


def auto_features(cnn: np.ndarray, small_images: Callable[..., Sequence], *, seed: int = 0,
                  hashes: Sequence[str] | None = None, cache: FeatureCache | None = None,
                  model: str | None = None, sample: int = CHOICE_SAMPLE, progress: bool = False
                  ) -> tuple[FeatureChoice, np.ndarray | None]:
    """``--features auto``: the choice among :data:`AUTO_CANDIDATES` and the winner's
    features (``None`` when the CNN wins: use ``cnn``).

    ``small_images`` is called only when needed (it decodes the small images):
    ``small_images(rows)`` for the scoring sample of ``sample`` rows (pixels and HOG are
    computed for those rows only), ``small_images()`` for every row when a candidate other
    than the CNN wins and its features are needed for all rows. With ``cache`` and ``hashes``
    (one content hash per row) the choice, and the winner's features when it is not the CNN,
    are read from / written to the cache under :func:`choice_key`, so a re-run on the same
    images neither scores candidates nor decodes a small image; the returned choice then
    says ``cached=True``.
    """
    sample = _check_int("sample", sample, 10)
    key = None
    if cache is not None and hashes is not None:
        if len(hashes) != len(cnn):
            raise FeatureError(f"{len(hashes)} hashes for {len(cnn)} rows")
        key = choice_key(hashes, seed=seed, model=model, sample=sample)
        hit = cache.get_json(key)
        if isinstance(hit, dict) and hit.get("name") in AUTO_CANDIDATES:
            t0 = time.perf_counter()
            choice = FeatureChoice.from_dict(hit)
            choice.cached = True
            choice.reason += " (cached: scored on an earlier build of these images)"
            X = None if choice.name == "cnn" else cache.get_or_compute(
                f"{key}-{choice.name}", lambda: compute(choice.name, small_images(), seed=seed))[0]
            choice.seconds = round(time.perf_counter() - t0, 2)
            return choice, X
    idx = _subsample(len(cnn), sample, seed)
    whole = len(idx) == len(cnn)
    small = small_images() if whole else small_images(idx)
    # score on the sample only: a large collection decodes 1,000 small images, not all
    cands = {"cnn": np.asarray(cnn)[idx]}
    for name in AUTO_CANDIDATES:
        if name != "cnn":
            cands[name] = compute(name, small, seed=seed)
    choice = choose_features(cands, seed=seed, sample=len(idx), progress=progress)
    if key is not None:
        cache.put_json(key, choice.to_dict())
    if choice.name == "cnn":
        return choice, None
    X = cands[choice.name] if whole else compute(choice.name, small_images(), seed=seed)
    if key is not None:  # the winner's features too: a re-run decodes no small image again
        cache.put(f"{key}-{choice.name}", X)
    return choice, X
