"""What the service takes in from strangers: names, zips, bombs, URLs (no server needed)."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import jpeg_bytes, variant  # noqa: E402

from explorer.service.fetch import FetchRules, URLRefused, check_url  # noqa: E402
from explorer.service.uploads import Intake, Limits, safe_relpath  # noqa: E402


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def make_zip(path: Path, members: list[tuple[str, bytes]], *, symlink: str | None = None,
             compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("name, expected", [
    ("../../etc/evil.jpg", "etc/evil.jpg"),
    ("/abs/path/x.jpg", "abs/path/x.jpg"),
    ("C:\\Windows\\x.jpg", "Windows/x.jpg"),
    ("a/./b/../c.jpg", "a/b/c.jpg"),
    ("..", None),
    ("", None),
])
def test_safe_relpath_never_leaves_the_folder(name, expected):
    assert safe_relpath(name) == expected


def test_safe_relpath_cleans_hostile_components():
    for name in ["con.jpg", ".hidden.jpg", "a\x00b.jpg", "x\ny.jpg", "<img src=x>.jpg",
                 "‮gpj.exe", "z" * 400 + ".jpg"]:
        rel = safe_relpath(name)
        assert rel is not None and ".." not in rel.split("/")
        assert not any(ord(c) < 32 for c in rel) and not rel.startswith(".")
        assert all(len(p) <= 100 for p in rel.split("/"))


def test_zip_slip_and_symlinks_stay_inside(tmp_path):
    images = tmp_path / "ds" / "images"
    outside_before = tree(tmp_path)
    z = make_zip(tmp_path / "in.zip", [
        ("../../escape.jpg", jpeg_bytes(variant(0, 32))),
        ("/etc/abs.jpg", jpeg_bytes(variant(1, 32))),
        ("sub/ok.jpg", jpeg_bytes(variant(2, 32))),
        ("dir/", b""),
    ], symlink="link.jpg")
    intake = Intake(images)
    intake.add_zip(z, "in.zip")
    got = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
    assert got == ["escape.jpg", "etc/abs.jpg", "sub/ok.jpg"]
    assert intake.added == 3
    assert [r["error"] for r in intake.report if not r["ok"]] == ["symbolic link; skipped"]
    # nothing new anywhere but the images folder (the staged zip is gone too)
    new = tree(tmp_path) - outside_before
    assert all(p.startswith("ds") for p in new), new
    assert not (tmp_path / "in.zip").exists()


def test_zip_bombs_refused(tmp_path):
    images = tmp_path / "images"
    zeros = b"\0" * (3 * 2**20)  # compresses about 1000:1
    z = make_zip(tmp_path / "bomb.zip", [("bomb.jpg", zeros), ("fine.jpg", jpeg_bytes(variant(0, 32)))])
    intake = Intake(images)
    intake.add_zip(z, "bomb.zip")
    errors = {r["name"]: r.get("error", "") for r in intake.report if not r["ok"]}
    assert "compression ratio" in errors["bomb.zip:bomb.jpg"]
    assert intake.added == 1

    # the declared total alone refuses the whole zip: nothing is extracted
    noise = np.random.default_rng(0).integers(0, 255, 600_000, dtype=np.uint8).tobytes()
    z = make_zip(tmp_path / "big.zip", [("a.jpg", noise), ("b.jpg", noise)])
    intake = Intake(tmp_path / "images2", Limits(max_zip_total=1_000_000))
    intake.add_zip(z, "big.zip")
    assert intake.added == 0
    assert "more than the limit" in intake.report[0]["error"]
    assert not any((tmp_path / "images2").iterdir())


def test_empty_non_image_oversized_and_nested_are_skipped_with_a_reason(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("x.jpg", jpeg_bytes(variant(0, 32)))
    big = jpeg_bytes(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8),
                     quality=100)
    z = make_zip(tmp_path / "mixed.zip", [
        ("empty.jpg", b""), ("notes.txt", b"hello"), ("fake.jpg", b"not a jpeg at all"),
        ("big.jpg", big), ("inner.zip", inner.getvalue()), ("good.png", _png()),
    ])
    intake = Intake(tmp_path / "images", Limits(max_file_bytes=len(big) - 1))
    intake.add_zip(z, "mixed.zip")
    why = {r["name"].split(":", 1)[-1]: r.get("error") for r in intake.report}
    assert why["empty.jpg"] == "empty file"
    assert "not an image" in why["notes.txt"] and "not an image" in why["fake.jpg"]
    assert "more than the limit" in why["big.jpg"]
    assert "not an image" in why["inner.zip"]
    assert why["good.png"] is None and intake.added == 1
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["good.png"]


def test_image_without_image_suffix_gets_one_and_names_never_collide(tmp_path):
    images = tmp_path / "images"
    intake = Intake(images)
    for i in range(3):
        f = tmp_path / f"staged{i}"
        f.write_bytes(jpeg_bytes(variant(i, 32)))
        intake.add_file(f, "photo" if i else "photo.jpg")
    names = sorted(p.name for p in images.iterdir())
    assert names == ["photo-2.jpg", "photo-3.jpg", "photo.jpg"]
    assert intake.added == 3


def test_pixel_bombs_refused(tmp_path):
    from PIL import Image

    f = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(f)  # tiny file, 144 M pixels
    intake = Intake(tmp_path / "images", Limits(max_pixels=50_000_000))
    intake.add_file(f, "huge.png")
    assert intake.added == 0 and "pixels" in intake.report[0]["error"]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(variant(3, 32)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- URLs
@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1/x.jpg", "loopback"),
    ("http://localhost:8000/x.jpg", "loopback"),
    ("http://10.1.2.3/x.jpg", "private"),
    ("http://192.168.0.10/x.jpg", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[::1]/x.jpg", "loopback"),
    ("http://[::ffff:127.0.0.1]/x.jpg", "loopback"),
    ("http://0.0.0.0/x.jpg", "unspecified"),
    ("file:///etc/passwd", "scheme"),
    ("ftp://93.184.216.34/x.jpg", "scheme"),
    ("gopher://93.184.216.34/", "scheme"),
    ("http://user:pw@93.184.216.34/x.jpg", "user name"),
    ("http:///x.jpg", "no host"),
    ("not a url", "scheme"),
])
def test_urls_to_private_addresses_and_other_schemes_are_refused(url, why):
    with pytest.raises(URLRefused, match=why):
        asyncio.run(check_url(url, FetchRules()))


@pytest.mark.parametrize("url, why", [
    ("http://[2002:7f00:1::]/x.jpg", "loopback, embedded 127.0.0.1"),      # 6to4 of 127.0.0.1
    ("http://[2002:a00:1::5]/x.jpg", "private, embedded 10.0.0.1"),        # 6to4 of 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/x.jpg", "embedded 169.254.169.254"),     # NAT64
    ("http://[64:ff9b::7f00:1]/x.jpg", "loopback, embedded 127.0.0.1"),
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/x.jpg", "embedded 10.0.0.1"),  # Teredo
])
def test_ipv6_addresses_that_embed_a_private_ipv4_are_refused(url, why):
    with pytest.raises(URLRefused, match=why):
        asyncio.run(check_url(url, FetchRules()))


def test_a_6to4_address_that_embeds_a_public_ipv4_passes():
    # (Python's tables already count all of 64:ff9b::/96 and 2001::/32 as not global)
    assert asyncio.run(check_url("http://[2002:5db8:d822::1]/x.jpg", FetchRules()))[0] == "http"


def test_bidi_overrides_and_other_format_characters_leave_uploaded_names(tmp_path):
    assert safe_relpath("\u202e gpj.exe") == "gpj.exe"
    assert safe_relpath("a\u2066b\u200b/c\u202d.jpg") == "ab/c.jpg"
    intake = Intake(tmp_path / "images")
    src = tmp_path / "up"
    src.write_bytes(jpeg_bytes(variant(0)))
    intake.add_file(src, "\u202e gpj.exe")
    assert intake.report[0]["ok"] and intake.report[0]["file"] == "gpj.exe.jpg"


def test_public_address_passes_and_private_passes_only_when_allowed():
    scheme, host, addr, port = asyncio.run(check_url("https://93.184.216.34/a.jpg", FetchRules()))
    assert (scheme, addr, port) == ("https", "93.184.216.34", 443)
    assert asyncio.run(check_url("http://127.0.0.1:9/x", FetchRules(allow_private=True)))[2] == \
        "127.0.0.1"


# --------------------------------------------------------------------------- streaming
def test_stream_from_passes_every_byte_and_stops_the_writer_when_the_client_goes():
    import threading as th

    from explorer.service.streams import stream_from

    chunks = [os.urandom(1000) for _ in range(200)]

    def write(f):
        with zipfile.ZipFile(f, "w") as zf:
            with zf.open("data.bin", "w") as out:
                for c in chunks:
                    out.write(c)

    async def collect():
        return b"".join([c async for c in stream_from(write, depth=2)])

    data = asyncio.run(collect())
    assert zipfile.ZipFile(io.BytesIO(data)).read("data.bin") == b"".join(chunks)

    stopped = th.Event()
    written = []

    def endless(f):
        try:
            while True:
                written.append(f.write(b"x" * 1000))
        finally:
            stopped.set()

    async def first_only():
        gen = stream_from(endless, depth=2)
        first = await gen.__anext__()
        await gen.aclose()
        return first

    assert asyncio.run(first_only()) == b"x" * 1000
    assert stopped.wait(5), "the writer thread ends when the client goes away"
    assert len(written) < 10, "bounded: the writer waited for the reader"


def test_a_zip_whose_members_overlap_is_refused_whole(tmp_path):
    """Review 2026-12-06 section 1.4: members sharing one stored kernel (here: two directory
    entries for the same bytes) are refused before anything is extracted."""
    import copy

    path = tmp_path / "overlap.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.jpg", jpeg_bytes(variant(0)))
        twin = copy.copy(zf.filelist[0])  # a second entry for the same local header and data
        zf.filelist.append(twin)
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in zf.infolist()] == ["a.jpg", "a.jpg"]
    intake = Intake(tmp_path / "images")
    intake.add_zip(path, "overlap.zip")
    assert intake.added == 0 and "overlap" in intake.report[0]["error"]
    ok = make_zip(tmp_path / "ok.zip", [("a.jpg", jpeg_bytes(variant(0))),
                                        ("b/c.jpg", jpeg_bytes(variant(1)))])
    intake.add_zip(ok, "ok.zip")
    assert intake.added == 2


def test_a_file_placed_by_another_request_meanwhile_is_never_overwritten(tmp_path, monkeypatch):
    """Review 2026-12-06 section 1.4: two intakes into one dataset; the name chosen for one
    is taken by the other before the move."""
    intake = Intake(tmp_path / "images")
    first = intake._target

    def racing(rel, fmt):  # another writer takes the name right after it was chosen
        target = first(rel, fmt)
        if not target.exists() and target.name == "a.jpg":
            target.write_bytes(b"the other request's image")
        return target

    monkeypatch.setattr(intake, "_target", racing)
    src = tmp_path / "up"
    src.write_bytes(jpeg_bytes(variant(0)))
    intake.add_file(src, "a.jpg")
    assert (tmp_path / "images" / "a.jpg").read_bytes() == b"the other request's image"
    assert intake.report[0] == {"name": "a.jpg", "ok": True, "file": "a-2.jpg"}
