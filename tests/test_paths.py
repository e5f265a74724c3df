"""The one rule for paths: hostile run records, CSV paths, symlinks and thumbnail URLs."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from explorer.stages.images import IMAGE_EXTENSIONS
from explorer.paths import (
    IMAGE_SUFFIXES,
    UnsafePath,
    check_image_root,
    image_root_from_run,
    is_app_relative_url,
    resolve_under,
    system_folder_reason,
)
from tests._imagegen import save, variant

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="needs POSIX symlinks")


@pytest.fixture()
def project(tmp_path):
    """tmp/images/{a/cat.jpg, b/dog.png, fake.jpg (text), notes.txt}, tmp/secret.jpg outside."""
    images = tmp_path / "images"
    save(variant(0, 32), images / "a" / "cat.jpg")
    save(variant(1, 32), images / "b" / "dog.png")
    (images / "fake.jpg").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (images / "notes.txt").write_text("hello")
    save(variant(2, 32), tmp_path / "secret.jpg")
    return tmp_path


def test_suffixes_match_what_discover_finds():
    assert IMAGE_SUFFIXES == {"." + e for e in IMAGE_EXTENSIONS}


def test_plain_relative_paths_resolve_inside(project):
    root = project / "images"
    got = resolve_under(root, "a/cat.jpg", must_be_image=True)
    assert got == (root / "a" / "cat.jpg").resolve()
    assert resolve_under(root, "b\\dog.png", must_be_image=True).name == "dog.png"
    assert resolve_under(root, "./a//cat.jpg").name == "cat.jpg"


@pytest.mark.parametrize("rel", ["../secret.jpg", "a/../../secret.jpg", "a/../cat.jpg",
                                 "..\\secret.jpg", "%s/secret.jpg" % ".."])
def test_dotdot_is_refused(project, rel):
    with pytest.raises(UnsafePath, match="'..'") as err:
        resolve_under(project / "images", rel)
    assert err.value.reason == "outside"


@pytest.mark.parametrize("rel", ["/etc/passwd", "\\\\server\\share\\x.jpg", "C:/Windows/x.jpg",
                                 "c:x.jpg", str(Path("/tmp/x.jpg"))])
def test_absolute_and_drive_paths_are_refused(project, rel):
    with pytest.raises(UnsafePath, match="absolute") as err:
        resolve_under(project / "images", rel)
    assert err.value.reason == "absolute"


@needs_symlinks
def test_symlink_pointing_out_is_refused(project):
    root = project / "images"
    os.symlink(project / "secret.jpg", root / "a" / "leak.jpg")
    os.symlink(project, root / "up")  # a symlinked folder that leads out
    with pytest.raises(UnsafePath, match="outside the image folder") as err:
        resolve_under(root, "a/leak.jpg", must_be_image=True)
    assert err.value.reason == "outside"
    with pytest.raises(UnsafePath, match="outside"):
        resolve_under(root, "up/secret.jpg")


@needs_symlinks
def test_symlink_staying_inside_is_followed(project):
    root = project / "images"
    os.symlink(root / "a" / "cat.jpg", root / "b" / "alias.jpg")
    os.symlink(root / "a", root / "linked")
    assert resolve_under(root, "b/alias.jpg") == (root / "a" / "cat.jpg").resolve()
    assert resolve_under(root, "linked/cat.jpg", must_be_image=True).name == "cat.jpg"


@needs_symlinks
def test_symlinked_root_is_resolved_first(project):
    os.symlink(project / "images", project / "pics")
    assert resolve_under(project / "pics", "a/cat.jpg") == (project / "images/a/cat.jpg").resolve()


def test_text_file_named_jpg_is_refused_only_when_images_are_required(project):
    root = project / "images"
    assert resolve_under(root, "fake.jpg").name == "fake.jpg"
    with pytest.raises(UnsafePath, match="does not open as an image") as err:
        resolve_under(root, "fake.jpg", must_be_image=True)
    assert err.value.reason == "not_image"
    with pytest.raises(UnsafePath, match="no image suffix"):
        resolve_under(root, "notes.txt", must_be_image=True)


def test_missing_folder_oversized_and_empty(project):
    root = project / "images"
    with pytest.raises(UnsafePath, match="not found") as err:
        resolve_under(root, "a/nope.jpg")
    assert err.value.reason == "missing"
    with pytest.raises(UnsafePath, match="not a regular file") as err:
        resolve_under(root, "a")
    assert err.value.reason == "not_file"
    size = (root / "a" / "cat.jpg").stat().st_size
    assert resolve_under(root, "a/cat.jpg", max_bytes=size).name == "cat.jpg"
    with pytest.raises(UnsafePath, match="limit") as err:
        resolve_under(root, "a/cat.jpg", max_bytes=size - 1)
    assert err.value.reason == "too_large"
    for rel in ("", "  ", "."):
        with pytest.raises(UnsafePath):
            resolve_under(root, rel)
    with pytest.raises(ValueError, match="max_bytes"):
        resolve_under(root, "a/cat.jpg", max_bytes=-1)


# --------------------------------------------------------------------------- roots
@pytest.mark.parametrize("path, refused", [
    ("/", "root of a filesystem"), ("/etc", "system folder /etc"),
    ("/etc/ssl", "inside the system folder /etc"), ("/usr/share/pixmaps", "/usr"),
    ("/proc/self", "/proc"), ("/lib64", "/lib64"), ("/var/lib", "/var"), ("/root", "/root"),
    ("/home/ann", "home folder"), ("/home", "holds your home folder"),
    ("/run/user/1000", "/run"), ("/private/etc", "/private/etc"),
    ("/home/ann/photos", None), ("/run/media/ann/usb", None), ("/mnt/data", None),
    ("/var/folders/xy/T/pytest", None), ("/tmp/x", None),
])  # fmt: skip
def test_posix_system_folders(path, refused):
    why = system_folder_reason(PurePosixPath(path), home=PurePosixPath("/home/ann"))
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


@pytest.mark.parametrize("path, refused", [
    ("C:\\", True), ("D:\\", True), ("C:\\Windows", True), ("c:\\windows\\System32", True),
    ("C:\\Program Files\\x", True), ("C:\\ProgramData", True), ("C:\\Users\\ann", True),
    ("C:\\Users\\ann\\Pictures", False), ("D:\\photos", False),
])  # fmt: skip
def test_windows_system_folders(path, refused):
    why = system_folder_reason(PureWindowsPath(path), home=PureWindowsPath("C:\\Users\\ann"))
    assert (why is not None) == refused


def test_check_image_root_on_disk(project):
    assert check_image_root(project / "images") == (project / "images").resolve()
    for bad in ("/", "/etc", str(Path.home())):
        with pytest.raises(UnsafePath, match="refused") as err:
            check_image_root(bad)
        assert err.value.reason == "bad_root"
    with pytest.raises(UnsafePath, match="not found"):
        check_image_root(project / "nope")
    with pytest.raises(UnsafePath, match="not a folder"):
        check_image_root(project / "secret.jpg")


@needs_symlinks
def test_symlink_root_to_a_system_folder_is_refused(project):
    os.symlink("/etc", project / "innocent")
    with pytest.raises(UnsafePath, match="/etc"):
        check_image_root(project / "innocent")


# --------------------------------------------------------------------------- run records
def _record(csv: Path, **run) -> None:
    csv.with_name(csv.stem + ".run.json").write_text(json.dumps(run))


def test_run_record_prefers_the_relative_folder(project, tmp_path):
    """L11: a moved project uses its own images, not whatever is at the old absolute path."""
    (project / "old").mkdir()
    csv = project / "demo.csv"
    _record(csv, image_dir=str(project / "old"), image_dir_from_csv="images")
    assert image_root_from_run(csv) == ((project / "images").resolve(), None)
    # the relative folder is gone: the absolute one is used
    _record(csv, image_dir=str(project / "old"), image_dir_from_csv="gone")
    assert image_root_from_run(csv) == ((project / "old").resolve(), None)
    # a record passed in is used as it is
    assert image_root_from_run(csv, {"image_dir_from_csv": "images"})[0] == \
        (project / "images").resolve()


@pytest.mark.parametrize("run", [
    {"image_dir": "/"}, {"image_dir": "/etc"}, {"image_dir_from_csv": "/etc"},
    {"image_dir_from_csv": "../../../../../../../../.."},
    {"image_dir_from_csv": "../../../../../../../../../etc", "image_dir": "IMAGES"},
    {"image_dir": str(Path.home())},
])  # fmt: skip
def test_hostile_run_record_roots_are_refused_with_a_message(project, run):
    csv = project / "demo.csv"
    run = {k: (str(project / "images") if v == "IMAGES" else v) for k, v in run.items()}
    _record(csv, **run)
    root, msg = image_root_from_run(csv)
    assert root is None
    assert "demo.run.json" in msg and "refused" in msg


@needs_symlinks
def test_run_record_root_that_is_a_symlink_out_is_refused(project):
    os.symlink("/", project / "everything")
    csv = project / "demo.csv"
    _record(csv, image_dir_from_csv="everything", image_dir=str(project / "images"))
    root, msg = image_root_from_run(csv)
    assert root is None and "refused" in msg and "root of a filesystem" in msg


def test_missing_or_broken_run_records_give_messages(project):
    csv = project / "demo.csv"
    assert image_root_from_run(csv) == (None, "no run record demo.run.json, so the original "
                                              "images are not known")
    csv.with_name("demo.run.json").write_text("{not json")
    assert "cannot read demo.run.json" in image_root_from_run(csv)[1]
    _record(csv, model="x")
    assert "names no image folder" in image_root_from_run(csv)[1]
    _record(csv, image_dir=["/etc"])
    assert "not text" in image_root_from_run(csv)[1]
    _record(csv, image_dir_from_csv="nope", image_dir=str(project / "nope2"))
    root, msg = image_root_from_run(csv)
    assert root is None and "not found" in msg and "nope2" in msg
    assert image_root_from_run(csv, ["not", "a", "dict"])[1] == "demo.run.json is not a JSON object"


# --------------------------------------------------------------------------- thumbnails
@pytest.mark.parametrize("value, ok", [
    ("static/thumbs/a.jpg", True), ("static/thumbs/a b%20c.jpg", True), ("x.jpg?v=2", True),
    ("", False), ("/static/thumbs/a.jpg", False), ("//evil.example/a.jpg", False),
    ("http://evil.example/a.jpg", False), ("https://x/a.jpg", False), ("javascript:alert(1)", False),
    ("data:image/png;base64,AAAA", False), ("static/../../etc/passwd", False),
    ("static/%2E%2E/x.jpg", False), ("\\\\evil.example\\a.jpg", False), (" //evil/a.jpg", False),
    ("static/\nthumbs.jpg", False), ("C:/x.jpg", False), (".", False),
])  # fmt: skip
def test_app_relative_urls(value, ok):
    assert is_app_relative_url(value) is ok
