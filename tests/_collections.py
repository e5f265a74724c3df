"""Labelled test and benchmark collections, generated (no files committed, no downloads).

Every generator returns ``(images, labels)``: a list of RGB uint8 arrays and a list of str
labels (the true class of each image), deterministic for a given ``seed``.

- :func:`glyphs`  letters rendered with the fonts on this machine (``fc-list``), random size,
  position, rotation and stroke colour: the class is the letter;
- :func:`digits`  digits centred at one size in every font (aligned glyphs, like forms);
- :func:`shapes`  generated shapes (disc, square, triangle, star, cross, ring), random size,
  position, rotation and colours: the class is the shape;
- :func:`pages`   scanned-looking pages (one column, two columns, a table, a form, a slide),
  with paper noise and skew: the class is the layout;
- :func:`photos`  crops of scikit-image's sample photos with colour jitter and flips: the
  class is the photo (``chelsea`` is a cat, ``coffee`` a cup of coffee, ...).

:func:`write_folder` saves a collection as ``root/<label>/<label>_<i>.png`` (folder = class,
as ``bench/quality.py`` expects).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

#: skimage sample photos used by :func:`photos` (name -> what it shows)
PHOTO_SOURCES = {
    "chelsea": "cat",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "hubble_deep_field": "galaxies",
    "immunohistochemistry": "tissue",
}
SHAPES = ("disc", "square", "triangle", "star", "cross", "ring")
LAYOUTS = ("column", "two_columns", "table", "form", "slide")
LETTERS = tuple("AEHKMORSWX")


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """TrueType/OpenType font files on this machine (from ``fc-list``), sorted."""
    try:
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True,
                             text=True, timeout=30).stdout
        files = sorted({f.strip() for f in out.splitlines()
                        if f.strip().lower().endswith((".ttf", ".otf"))})
    except (OSError, subprocess.SubprocessError):
        files = []
    usable = []
    for f in files:
        try:
            font = ImageFont.truetype(f, 20)
            if font.getbbox("A")[2] > 0 and "Math" not in Path(f).name:
                usable.append(f)
        except OSError:
            continue
    return tuple(usable)


def _font(path: str | None, size: int):
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def glyphs(n_per_class: int = 30, *, letters=LETTERS, size: int = 64, seed: int = 0):
    """Letters in every font of the machine: ``(images, labels)``, label = the letter."""
    rng = np.random.default_rng(seed)
    fonts = list(font_files()) or [None]
    images, labels = [], []
    for letter in letters:
        for i in range(n_per_class):
            font = _font(fonts[int(rng.integers(len(fonts)))], int(size * rng.uniform(0.55, 0.8)))
            bg = int(rng.integers(215, 256))
            img = Image.new("L", (size * 2, size * 2), 0)
            d = ImageDraw.Draw(img)
            d.text((size, size), letter, fill=255, font=font, anchor="mm")
            img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
            dx, dy = rng.integers(-size // 10, size // 10 + 1, size=2)
            img = img.crop((size // 2 + dx, size // 2 + dy, size // 2 + dx + size,
                            size // 2 + dy + size))
            ink = np.array(rng.integers(0, 90, size=3), dtype=np.float32)
            a = np.asarray(img, dtype=np.float32)[..., None] / 255.0
            rgb = (1 - a) * bg + a * ink
            images.append(np.clip(rgb, 0, 255).astype(np.uint8))
            labels.append(letter)
    return images, labels


def digits(n_per_class: int = 30, *, size: int = 32, seed: int = 0):
    """Digits 0-9 centred at one size, black on white, in the machine's fonts with a pixel
    or two of jitter (aligned glyphs, like scanned forms): ``(images, labels)``."""
    rng = np.random.default_rng(seed)
    fonts = list(font_files()) or [None]
    images, labels = [], []
    for d in "0123456789":
        for i in range(n_per_class):
            font = _font(fonts[i % len(fonts)], int(size * 0.8))
            img = Image.new("L", (size, size), 255)
            dx, dy = rng.integers(-1, 2, size=2)
            ImageDraw.Draw(img).text((size / 2 + dx, size / 2 + dy), d, fill=0, font=font,
                                     anchor="mm")
            a = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, size=(size, size))
            images.append(np.repeat(np.clip(a, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
            labels.append(d)
    return images, labels


def _star(cx, cy, r, rot, points=5):
    pts = []
    for k in range(points * 2):
        rr = r if k % 2 == 0 else r * 0.42
        a = rot + k * np.pi / points
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def _polygon(cx, cy, r, rot, n):
    return [(cx + r * np.cos(rot + 2 * np.pi * k / n), cy + r * np.sin(rot + 2 * np.pi * k / n))
            for k in range(n)]


def shapes(n_per_class: int = 30, *, kinds=SHAPES, size: int = 64, seed: int = 0):
    """Filled shapes on plain backgrounds: ``(images, labels)``, label = the shape."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for kind in kinds:
        for _ in range(n_per_class):
            bg = tuple(int(v) for v in rng.integers(180, 256, size=3))
            fg = tuple(int(v) for v in rng.integers(0, 140, size=3))
            img = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(img)
            r = size * rng.uniform(0.25, 0.38)
            cx, cy = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
            rot = float(rng.uniform(0, 2 * np.pi))
            if kind == "disc":
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
            elif kind == "ring":
                d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(2, size // 12))
            elif kind == "square":
                d.polygon(_polygon(cx, cy, r * 1.2, rot, 4), fill=fg)
            elif kind == "triangle":
                d.polygon(_polygon(cx, cy, r * 1.2, rot, 3), fill=fg)
            elif kind == "star":
                d.polygon(_star(cx, cy, r * 1.25, rot), fill=fg)
            elif kind == "cross":
                w = r * 0.35
                for a in (rot, rot + np.pi / 2):
                    c, s = np.cos(a), np.sin(a)
                    pts = [(cx + c * x - s * y, cy + s * x + c * y)
                           for x, y in ((-r, -w), (r, -w), (r, w), (-r, w))]
                    d.polygon(pts, fill=fg)
            else:
                raise ValueError(f"unknown shape {kind!r}")
            images.append(np.asarray(img))
            labels.append(kind)
    return images, labels


def _text_line(d, x0, y, x1, rng, height, ink):
    """A line of 'words' (dark bars with gaps), like text seen from afar."""
    x = x0
    while x < x1:
        w = int(rng.integers(height, height * 5))
        if x + w > x1:
            break
        d.rectangle((x, y, x + w, y + height), fill=ink)
        x += w + int(rng.integers(height // 2 + 1, height + 2))


def pages(n_per_class: int = 30, *, layouts=LAYOUTS, size: int = 96, seed: int = 0):
    """Scanned-looking pages: ``(images, labels)``, label = the layout."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for kind in layouts:
        for _ in range(n_per_class):
            W, H = size * 2, int(size * 2 * 1.3)
            paper = int(rng.integers(220, 250))
            img = Image.new("L", (W, H), paper)
            d = ImageDraw.Draw(img)
            ink = int(rng.integers(10, 70))
            m = int(W * rng.uniform(0.07, 0.12))
            lh = max(2, int(H * rng.uniform(0.012, 0.018)))
            gap = lh * int(rng.integers(2, 4))
            if kind == "column":
                for y in range(m, H - m, gap):
                    _text_line(d, m, y, W - m, rng, lh, ink)
            elif kind == "two_columns":
                mid = W // 2
                for y in range(m, H - m, gap):
                    _text_line(d, m, y, mid - m // 2, rng, lh, ink)
                    _text_line(d, mid + m // 2, y, W - m, rng, lh, ink)
            elif kind == "table":
                rows, cols = int(rng.integers(6, 12)), int(rng.integers(3, 6))
                top = m + int(H * 0.08)
                ys = np.linspace(top, H - m, rows + 1).astype(int)
                xs = np.linspace(m, W - m, cols + 1).astype(int)
                _text_line(d, m, m, W // 2, rng, lh * 2, ink)
                for y in ys:
                    d.line((m, y, W - m, y), fill=ink, width=2)
                for x in xs:
                    d.line((x, top, x, H - m), fill=ink, width=2)
            elif kind == "form":
                n = int(rng.integers(5, 9))
                for k, y in enumerate(np.linspace(m, H - m - lh * 3, n).astype(int)):
                    _text_line(d, m, y, m + W // 4, rng, lh, ink)
                    d.rectangle((W // 2 - m, y - lh, W - m, y + lh * 2), outline=ink, width=2)
            elif kind == "slide":
                _text_line(d, m, m, W - m, rng, lh * 3, ink)
                box = (m, H // 3, W - m, H - m)
                d.rectangle(box, fill=int(rng.integers(90, 160)))
            else:
                raise ValueError(f"unknown layout {kind!r}")
            img = img.rotate(float(rng.uniform(-3, 3)), fillcolor=paper,
                             resample=Image.Resampling.BILINEAR)
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
            img = img.resize((size, int(size * 1.3)), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.float32)
            a = a + rng.normal(0, rng.uniform(3, 12), size=a.shape)
            tint = np.array([1.0, rng.uniform(0.97, 1.0), rng.uniform(0.9, 1.0)], np.float32)
            rgb = np.clip(a[..., None] * tint, 0, 255).astype(np.uint8)
            images.append(rgb)
            labels.append(kind)
    return images, labels


@lru_cache(maxsize=None)
def _source(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def photos(n_per_class: int = 30, *, sources=tuple(PHOTO_SOURCES), size: int = 96, seed: int = 0):
    """Crops of skimage sample photos: ``(images, labels)``, label = the photo's name."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in sources:
        src = _source(name)
        h, w = src.shape[:2]
        for _ in range(n_per_class):
            side = int(min(h, w) * rng.uniform(0.6, 0.9))
            y = int(rng.integers(0, h - side + 1))
            x = int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(src[y:y + side, x:x + side]).resize(
                (size, size), Image.Resampling.BILINEAR)
            a = np.asarray(crop, dtype=np.float32)
            a = a * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-15, 15)
            if rng.random() < 0.5:
                a = a[:, ::-1]
            images.append(np.clip(a, 0, 255).astype(np.uint8))
            labels.append(name)
    return images, labels


COLLECTIONS = {"glyphs": glyphs, "digits": digits, "shapes": shapes, "pages": pages,
               "photos": photos}


def non_photographic(n_per_class: int = 30, *, seed: int = 0):
    """Glyphs, shapes and pages together (21 classes), the held-out non-photo set of the benches."""
    images, labels = [], []
    for name in ("glyphs", "shapes", "pages"):
        im, lab = COLLECTIONS[name](n_per_class, seed=seed)
        images += im
        labels += [f"{name}-{x}" for x in lab]
    return images, labels


def write_folder(images, labels, root, ext: str = "png") -> list[Path]:
    """Save as ``root/<label>/<label>_<i>.<ext>``; returns the paths in input order."""
    root = Path(root)
    out = []
    for i, (a, lab) in enumerate(zip(images, labels)):
        p = root / str(lab) / f"{lab}_{i}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        out.append(p)
    return out
