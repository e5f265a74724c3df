"""explorer.stages.images: discover, decode (every mode, EXIF, draft, bad files), DocArray, thumbnails."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import _imagegen as gen
except ImportError:  # tests/ made a package
    from tests import _imagegen as gen

from explorer.stages.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decode_image,
    discover,
    load,
    load_image,
    natural_key,
    thumbnail,
    thumbnail_names,
)


# --------------------------------------------------------------------------- discover
def rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_discover_natural_order_extensions_and_hidden(tmp_path):
    names = ["img10.jpg", "img2.png", "img1.JPEG", "b/x.webp", "a/z.tif", "A/y.BMP",
             "c.gif", "d.tiff", "e.txt", "f.jpg.bak", "noext", ".hidden.jpg",
             ".cache/in_hidden.jpg", "sub/.also_hidden.png"]
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # discover looks at names only
    got = rel(discover(tmp_path), tmp_path)
    assert got == ["A/y.BMP", "a/z.tif", "b/x.webp", "c.gif", "d.tiff",
                   "img1.JPEG", "img2.png", "img10.jpg"]
    # deterministic, whatever the directory listing order
    assert rel(discover(tmp_path), tmp_path) == got


def test_discover_natural_key_numbers():
    keys = sorted(["img10", "img2", "img1", "img02b", "IMG3"], key=natural_key)
    assert keys == ["img1", "img2", "img02b", "IMG3", "img10"]


def test_discover_finds_every_image_extension_in_any_case(tmp_path):
    exts = ["jpg", "JPEG", "png", "WebP", "bmp", "gif", "tif", "TIFF"]
    for k, e in enumerate(exts):
        (tmp_path / f"f{k}.{e}").write_bytes(b"x")
    for other in ["a.txt", "b.jpg.part", "c.svg", "noext"]:
        (tmp_path / other).write_bytes(b"x")
    assert sorted(p.name for p in discover(tmp_path)) == sorted(
        f"f{k}.{e}" for k, e in enumerate(exts))


def test_read_file_hashes_while_reading_and_refuses_big_files(tmp_path):
    from explorer.stages.images import ImageLoadError, content_hash, read_file

    p = gen.save(gen.variant(1, 64), tmp_path / "a.png")
    data, h = read_file(p)
    assert data == p.read_bytes() and h == content_hash(data)
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(3 * 2**20)
    with pytest.raises(ImageLoadError, match="file too large"):
        read_file(big, max_bytes=2**20)
    assert read_file(big, max_bytes=4 * 2**20)[0] == bytes(3 * 2**20)


def test_discover_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        discover(tmp_path / "missing")
    f = gen.save(gen.variant(0, 16), tmp_path / "one.png")
    with pytest.raises(ValueError, match="not a directory"):
        discover(f)


def test_discover_empty_folder(tmp_path):
    assert discover(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_discover_survives_symlink_loop(tmp_path):
    gen.save(gen.variant(1, 16), tmp_path / "a" / "p.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a -> root -> a -> ...
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "broken.jpg")
    got = rel(discover(tmp_path), tmp_path)
    assert got == ["a/p.png"]


# --------------------------------------------------------------------------- modes
def _rgb_ok(img, size):
    assert img.mode == "RGB"
    assert img.size == size


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "I;16", "I", "L", "LA", "1", "F"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = gen.photo("coffee")[:60, :80]
    base = Image.fromarray(arr)
    if mode == "I;16":
        grey = np.asarray(base.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(grey)  # uint16 -> I;16
        assert img.mode.startswith("I;16")
        suffix = "png"
    elif mode == "I":
        grey = np.asarray(base.convert("L")).astype(np.int32) * 257
        img = Image.fromarray(grey, "I")
        suffix = "tif"
    elif mode == "F":
        img = base.convert("F")
        suffix = "tif"
    else:
        img = base.convert(mode)
        suffix = {"CMYK": "jpg", "P": "gif", "1": "bmp"}.get(mode, "png")
    path = gen.save(img, tmp_path / f"m.{suffix}")
    got, size = load_image(path)
    _rgb_ok(got, (80, 60))
    assert size == (80, 60)
    if mode in ("I;16", "I", "F", "L"):
        # 16/32-bit grey scaled to 8 bits, not clipped to white
        want = np.asarray(base.convert("L")).astype(float)
        assert np.abs(np.asarray(got)[..., 0].astype(float) - want).mean() < 3


def test_alpha_is_composited_on_white(tmp_path):
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[..., 0] = 200  # red, fully transparent on the left half
    arr[:, 6:, 3] = 255
    path = gen.save(Image.fromarray(arr, "RGBA"), tmp_path / "alpha.png")
    got = np.asarray(load_image(path).image)
    assert (got[:, :6] == 255).all()  # transparent -> white
    assert (got[:, 6:] == [200, 0, 0]).all()
    la = Image.fromarray(arr[..., [0, 3]], "LA")
    got = np.asarray(load_image(gen.save(la, tmp_path / "la.png")).image)
    assert (got[:, :6] == 255).all()
    # palette with a transparent index
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    path = gen.save(p, tmp_path / "p.png", transparency=0)
    got = np.asarray(load_image(path).image)
    assert tuple(got[0, 0]) == (10, 200, 30) and tuple(got[3, 3]) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    got = np.asarray(load_image(path).image)
    assert got[..., 0].mean() > 200 and got[..., 2].mean() < 50


# --------------------------------------------------------------------------- EXIF / draft
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_rotates(tmp_path, orientation):
    arr = np.zeros((40, 80, 3), np.uint8)  # landscape, bright left edge
    arr[:, :10] = 255
    path = gen.with_orientation(arr, tmp_path / f"o{orientation}.jpg", orientation)
    img, (w, h) = load_image(path)
    if orientation in (6, 8):
        assert img.size == (40, 80) and (w, h) == (40, 80)
        g = np.asarray(img).mean(axis=(1, 2))
        # 6 = rotate 90 cw to view: left edge goes to the top; 8: to the bottom
        assert (g[:10].mean() > 200) == (orientation == 6)
        assert (g[-10:].mean() > 200) == (orientation == 8)
    else:
        assert img.size == (80, 40) and (w, h) == (80, 40)
        g = np.asarray(img).mean(axis=(0, 2))
        assert (g[:10].mean() > 200) == (orientation == 1)


def test_jpeg_draft_decodes_smaller_but_reports_original_size(tmp_path):
    arr = np.asarray(Image.fromarray(gen.photo("astronaut")).resize((1024, 768)))
    path = gen.save(arr, tmp_path / "big.jpg")
    img, size = load_image(path, size=200)
    assert size == (1024, 768)
    assert min(img.size) >= 200 and img.size[0] < 1024  # 1/2 scale: 512 x 384
    assert img.size == (256, 192) or img.size == (512, 384)
    full, size2 = load_image(path)
    assert full.size == (1024, 768) and size2 == (1024, 768)
    # rotated file: draft size and original size both follow the rotation
    rot = gen.with_orientation(arr, tmp_path / "rot.jpg", 6)
    img, size = load_image(rot, size=200)
    assert size == (768, 1024) and img.size[1] > img.size[0] and min(img.size) >= 200
    # png ignores size: full decode
    png = gen.save(arr[:100, :120], tmp_path / "x.png")
    assert load_image(png, size=20).image.size == (120, 100)


def test_bad_size_parameter(tmp_path):
    path = gen.save(gen.variant(0, 16), tmp_path / "a.png")
    with pytest.raises(ValueError, match="size"):
        load_image(path, size=0)
    with pytest.raises(ValueError, match="max_side"):
        thumbnail(Image.new("RGB", (4, 4)), max_side=-1)


# --------------------------------------------------------------------------- bad files
def test_bad_files_give_reasons(tmp_path):
    cases = {
        gen.empty(tmp_path / "empty.jpg"): "empty file",
        gen.not_an_image(tmp_path / "notes.jpg"): "not an image",
        gen.truncated(tmp_path / "cut.jpg"): "truncated file",
        tmp_path / "missing.jpg": "file not found",
    }
    png = gen.save(gen.photo("rocket"), tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 3])
    cases[tmp_path / "cut.png"] = "truncated file"
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert info.value.reason == reason, path
        assert isinstance(info.value, ValueError)
        assert path.name in str(info.value)


def test_decompression_bomb_guard(tmp_path):
    path = gen.save(np.zeros((300, 400, 3), np.uint8), tmp_path / "wide.png")
    with pytest.raises(ImageLoadError, match=r"decompression bomb: 120000 pixels"):
        load_image(path, max_pixels=100_000)
    # the global Pillow limit is honoured too
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert load_image(path).size == (400, 300)


def test_decode_image_from_bytes():
    data = gen.jpeg_bytes(gen.photo("chelsea"))
    img, size = decode_image(data)
    assert size == (451, 300) and img.size == (451, 300)
    with pytest.raises(ImageLoadError, match="empty file"):
        decode_image(b"")


# --------------------------------------------------------------------------- DocArray
def test_load_doclist_and_errors(tmp_path):
    good = gen.image_folder(tmp_path, 3, size=32)
    bad = gen.not_an_image(tmp_path / "a" / "bad.png")
    docs, errors = load([*good, bad], root=tmp_path)
    assert len(docs) == 3
    assert docs.url == [p.relative_to(tmp_path).as_posix() for p in good]
    for d in docs:
        assert not d.url.startswith("file:")
        t = np.asarray(d.tensor)
        assert t.shape == (32, 32, 3) and t.dtype == np.uint8
    assert errors == [(str(bad), "not an image")]
    np.testing.assert_array_equal(
        np.asarray(docs[0].tensor), np.asarray(Image.open(good[0]).convert("RGB"))
    )
    # without root: url is the path string as given
    docs, _ = load([good[1]])
    assert docs[0].url == str(good[1])


# --------------------------------------------------------------------------- thumbnails
def test_thumbnail_keeps_aspect():
    img = Image.fromarray(gen.photo("chelsea"))  # 451 x 300
    th = thumbnail(img, 128)
    assert th.size == (128, 85) and th.mode == "RGB"
    assert img.size == (451, 300)  # input untouched
    small = Image.new("RGB", (50, 20))
    assert thumbnail(small, 128).size == (50, 20)  # never enlarges


SAFE = re.compile(r"^[a-z0-9_-]+\.jpg$")


def test_thumbnail_names_unique_safe_deterministic():
    rels = ["a.jpg", "sub/a.jpg", "other/sub/a.jpg", "A.jpg", "a.png",
            "../x.jpg", "../../etc/passwd", "<img src=x onerror=alert(1)>.jpg",
            "ünïcödé/日本語の写真.jpg", "x" * 400 + ".jpg", "con.jpg", "a b/c d.JPG",
            "", ".jpg", "-.jpg", "a/.hidden"]
    names = thumbnail_names(rels)
    assert len(set(names)) == len(rels)
    assert len({n.lower() for n in names}) == len(rels)  # case-insensitive filesystems
    for n in names:
        assert SAFE.match(n), n
        assert len(n) <= 80 and ".." not in n and "/" not in n
    assert names == thumbnail_names(rels)
    # a name depends on its own relpath only (not on the other files in the run)
    assert thumbnail_names(["sub/a.jpg"]) == [names[1]]
    assert thumbnail_names([Path("sub") / "a.jpg"]) == [names[1]]
    assert names[0].startswith("a-") and names[1].startswith("a-")  # readable stems


def test_hostile_file_names_survive_discover_load_and_thumbnail_names(tmp_path):
    arr = gen.variant(2, 24)
    names = ["new\nline.png", "quote'\"<b>.png", "spa ce & amp.png", "日本.png"]
    paths = [gen.save(arr, tmp_path / n) for n in names]
    raw = os.fsencode(tmp_path) + b"/bad-\xff\xfe-bytes.png"  # not valid UTF-8
    with open(raw, "wb") as fh:
        fh.write(paths[0].read_bytes())
    found = discover(tmp_path)
    assert len(found) == 5
    for p in found:
        img, size = load_image(p)
        assert size == (24, 24) and img.mode == "RGB"
    rels = [p.relative_to(tmp_path).as_posix() for p in found]
    out = thumbnail_names(rels)
    assert len(set(out)) == 5 and all(SAFE.match(n) for n in out)
