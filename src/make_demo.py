"""Make the demo: generate images from scikit-image's sample photos, then `explorer build` them.

    .venv/bin/python src/make_demo.py            # -> demo_images/, demo/ and demo.csv
    .venv/bin/python src/make_demo.py --images-only --out /tmp/imgs --per-source 5

Each of 14 sample photos gives a family of variants (crops, flips, rotations, colour shifts,
blur, greyscale, JPEG recompression), so the map has real groups to find, plus a few exact
and near-exact duplicates for the duplicate_group column. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]

#: sample photos that scikit-image ships (no download needed)
SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
           "immunohistochemistry", "retina", "stereo_motorcycle", "brick", "grass", "page",
           "colorwheel"]


def source_image(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if isinstance(a, tuple):
        a = a[0]
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    img = Image.fromarray(a)
    return img.convert("RGB")


def variant(img: Image.Image, rng: np.random.Generator, max_side: int) -> Image.Image:
    """A random but recognisable variant of ``img``."""
    w, h = img.size
    s = rng.uniform(0.55, 0.95)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    if rng.random() < 0.15:
        out = out.rotate(90 * int(rng.integers(1, 4)), expand=True)
    if rng.random() < 0.5:
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.4, 1.6))
    if rng.random() < 0.5:
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.1:
        out = ImageOps.grayscale(out).convert("RGB")
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out


def make_images(out: Path, per_source: int = 22, seed: int = 0, max_side: int = 320) -> int:
    """Write ``per_source`` variants of each source photo into ``out/<source>/``."""
    rng = np.random.default_rng(seed)
    n = 0
    for name in SOURCES:
        src = source_image(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_source):
            variant(src, rng, max_side).save(folder / f"{name}_{i:02d}.jpg", quality=85)
            n += 1
        # near-duplicates: a recompressed copy and a slightly brighter copy of variant 0
        v0 = Image.open(folder / f"{name}_00.jpg").convert("RGB")
        v0.save(folder / f"{name}_00_copy.jpg", quality=60)
        ImageEnhance.Brightness(v0).enhance(1.08).save(folder / f"{name}_00_bright.jpg", quality=85)
        n += 2
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "demo_images"), help="where the images go")
    p.add_argument("--app", default=str(ROOT / "demo"), help="app folder to build")
    p.add_argument("--per-source", type=int, default=22)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    n = make_images(out, a.per_source, a.seed)
    print(f"wrote {n} images to {out}")
    if a.images_only:
        return 0
    from explorer.cli import main as cli

    app = Path(a.app)
    if (app / "static" / "thumbs").exists():
        shutil.rmtree(app / "static" / "thumbs")  # a fresh demo: no stale thumbnails
    rc = cli(["build", str(out), "--app", str(app), "--seed", "42"])  # reproducible demo
    if rc == 0:
        _relative_run_record(ROOT / "demo.run.json")
    return rc


def _relative_run_record(path: Path) -> None:
    """The committed record names this machine's folders relative to the repo, not absolutely
    (the app finds the images through ``image_dir_from_csv`` either way)."""
    import json

    from explorer.table import write_json

    if not path.is_file():
        return
    run = json.loads(path.read_text())
    for field in ("image_dir", "app"):
        if run.get(field):
            p = Path(run[field])
            if p.is_absolute() and (p == ROOT or ROOT in p.parents):
                run[field] = p.relative_to(ROOT).as_posix()
    write_json(path, run)


if __name__ == "__main__":
    sys.exit(main())
