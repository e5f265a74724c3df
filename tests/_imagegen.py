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
