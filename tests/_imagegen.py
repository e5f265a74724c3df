"""Test images made from ``skimage.data`` (no downloads, no copies of real data).

Helpers return paths of files written under a caller's ``tmp_path``.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

#: skimage.data samples that are colour photos (name -> function name)
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@lru_cache(maxsize=None)
def photo(name: str = "chelsea") -> np.ndarray:
    """An RGB uint8 array from skimage.data (``camera`` is made RGB from grey)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def save(arr_or_img, path: Path, **kw) -> Path:
    """Save an array / PIL image; format from the suffix. Creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)
    return path


def variant(i: int, size: int = 96) -> np.ndarray:
    """The i-th distinct small RGB image: a crop of one of the photos, shifted by i."""
    names = PHOTOS + ("camera",)
    src = photo(names[i % len(names)])
    h, w = src.shape[:2]
    k = i // len(names)
    y = (k * 37) % max(1, h - size)
    x = (k * 53) % max(1, w - size)
    return np.ascontiguousarray(src[y : y + size, x : x + size])


def image_folder(root: Path, n: int, *, size: int = 96, ext: str = "jpg") -> list[Path]:
    """``n`` distinct images in ``root`` over two sub-folders, named img0..img{n-1}."""
    paths = []
    for i in range(n):
        sub = "a" if i % 2 == 0 else "b"
        paths.append(save(variant(i, size), Path(root) / sub / f"img{i}.{ext}"))
    return paths


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def with_orientation(arr: np.ndarray, path: Path, orientation: int) -> Path:
    """A JPEG whose EXIF says ``orientation`` (pixels stored as given)."""
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, path, exif=exif.tobytes())


def truncated(path: Path, arr: np.ndarray | None = None, keep: float = 0.5) -> Path:
    """A JPEG cut off after ``keep`` of its bytes."""
    data = jpeg_bytes(photo("chelsea") if arr is None else arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def not_an_image(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is a text file, not a picture\n" * 20)
    return path


def empty(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


#: what :func:`low_texture` makes, in turn
LOW_TEXTURE_KINDS = ("flat sky", "blank page", "line art", "flat colour")


def low_texture(i: int, size: int = 128) -> np.ndarray:
    """The i-th distinct low-texture RGB image (``LOW_TEXTURE_KINDS[i % 4]``): a flat sky
    (a soft blue gradient with slight noise), a blank page with a few words, line art (a few
    thin black strokes on white) or a flat colour with slight noise. The images where bf16
    vectors drift furthest from float32 (review 2026-12-06, section 3.3)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1000 + i)
    kind = LOW_TEXTURE_KINDS[i % len(LOW_TEXTURE_KINDS)]
    yy = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    if kind == "flat sky":
        top = np.array([90, 140, 215], np.float32) + rng.uniform(-25, 25, 3)
        bottom = np.array([170, 200, 235], np.float32) + rng.uniform(-15, 15, 3)
        base = top + (bottom - top) * yy * rng.uniform(0.5, 1.0)
        arr = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 2.0, (size, size, 3))
    elif kind == "flat colour":
        arr = rng.uniform(30, 225, 3) + rng.normal(0, 3.0, (size, size, 3))
    else:
        paper = 255 - rng.uniform(0, 12)
        img = Image.new("RGB", (size, size), (int(paper),) * 3)
        draw = ImageDraw.Draw(img)
        if kind == "blank page":
            words = ["notes", "page", "draft", "total", "date", "name", "ok", "list"]
            for _ in range(int(rng.integers(1, 4))):
                xy = (int(rng.integers(4, size // 2)), int(rng.integers(4, size - 16)))
                draw.text(xy, " ".join(rng.choice(words, 2)), fill=(20, 20, 20))
        else:
            for _ in range(int(rng.integers(2, 5))):
                a, b = rng.integers(0, size, 2), rng.integers(0, size, 2)
                if rng.random() < 0.5:
                    draw.line([tuple(a), tuple(b)], fill=(0, 0, 0), width=2)
                else:
                    r = int(rng.integers(6, size // 4))
                    draw.ellipse([a[0] - r, a[1] - r, a[0] + r, a[1] + r], outline=(0, 0, 0),
                                 width=2)
        arr = np.asarray(img, np.float32) + rng.normal(0, 1.0, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)
