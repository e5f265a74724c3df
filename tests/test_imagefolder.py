"""ImageFolder export: loads with torchvision, safe names, no overwrite, missing files reported."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data

from explorer.curation.exports import LABELS_CSV, export_imagefolder
from explorer.curation.journal import Journal
from explorer.curation.labels import LabelBook, labelled_table


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b").mkdir()
    sources = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
               "rocket": data.rocket(), "camera": data.camera()}
    for name, arr in sources.items():
        img = Image.fromarray(arr).convert("RGB").resize((48, 40))
        img.save(root / "a" / f"{name}.jpg", quality=85)
    # same file name in another folder, and an odd extension
    Image.fromarray(data.chelsea()).convert("RGB").resize((48, 40)).save(root / "b" / "chelsea.jpg")
    Image.fromarray(data.camera()).resize((48, 40)).save(root / "b" / "camera.gif")
    (root / "outside.jpg").write_bytes(b"")  # only used via a hostile path
    return root


def frame(rows):
    return pd.DataFrame(rows, columns=["path", "label"]).assign(
        image="", x=0.0, y=0.0, cluster=0, probability=1.0, outlier_score=0.0, width=48, height=40
    )


BASIC = [
    ("a/chelsea.jpg", "cat"),
    ("b/chelsea.jpg", "cat"),
    ("a/coffee.jpg", "drink"),
    ("a/astronaut.jpg", "person"),
    ("a/rocket.jpg", ""),
    ("a/camera.jpg", "discard"),
]


def test_folder_export_loads_with_torchvision(image_root, tmp_path):
    from torchvision.datasets import ImageFolder

    summary = export_imagefolder(frame(BASIC), image_root, tmp_path / "out", progress=False)
    ds = ImageFolder(str(tmp_path / "out"))
    assert ds.classes == ["cat", "drink", "person"]
    assert len(ds) == 4
    counts = np.bincount([t for _, t in ds.samples])
    assert counts.tolist() == [2, 1, 1]
    img, target = ds[0]
    assert img.size == (48, 40) and ds.classes[target] == "cat"
    assert summary["images"] == 4 and summary["classes"] == {"cat": 2, "drink": 1, "person": 1}
    assert summary["skipped_unlabelled"] == 1 and summary["skipped_discard"] == 1
    assert summary["renamed"] == 1  # the second chelsea.jpg
    assert sorted(p.name for p in (tmp_path / "out" / "cat").iterdir()) == [
        "b__chelsea.jpg", "chelsea.jpg",  # the second one keeps its folder in its name
    ]
    csv = pd.read_csv(tmp_path / "out" / LABELS_CSV, keep_default_na=False)
    assert len(csv) == 4 and set(csv["label"]) == {"cat", "drink", "person"}
    assert all((tmp_path / "out" / p).is_file() for p in csv["export_path"])


def test_zip_export_loads_after_unzipping(image_root, tmp_path):
    from torchvision.datasets import ImageFolder

    summary = export_imagefolder(frame(BASIC), image_root, tmp_path / "labelled", as_zip=True,
                                 progress=False)
    z = tmp_path / "labelled.zip"
    assert summary["dest"] == str(z) and z.is_file()
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert all(n.startswith("labelled/") for n in names)
        assert f"labelled/{LABELS_CSV}" in names
        zf.extractall(tmp_path / "x")
    ds = ImageFolder(str(tmp_path / "x" / "labelled"))
    assert ds.classes == ["cat", "drink", "person"] and len(ds) == 4


def test_keep_unlabelled_and_discard_when_asked(image_root, tmp_path):
    summary = export_imagefolder(frame(BASIC), image_root, tmp_path / "all",
                                 skip_unlabelled=False, skip_discard=False, progress=False)
    assert summary["classes"] == {"cat": 2, "drink": 1, "person": 1, "": 1, "discard": 1}
    assert summary["folders"][""] == "unlabelled"
    assert (tmp_path / "all" / "unlabelled" / "rocket.jpg").is_file()
    csv = pd.read_csv(tmp_path / "all" / LABELS_CSV, keep_default_na=False)
    assert csv.set_index("path").loc["a/rocket.jpg", "label"] == ""  # not given a label


def test_a_real_label_named_unlabelled_is_not_merged(image_root, tmp_path):
    """L9: the label "unlabelled" and the rows without a label stay two classes."""
    rows = [("a/chelsea.jpg", "unlabelled"), ("a/coffee.jpg", "unlabelled"), ("a/rocket.jpg", ""),
            ("a/astronaut.jpg", "person")]
    summary = export_imagefolder(frame(rows), image_root, tmp_path / "out",
                                 skip_unlabelled=False, progress=False)
    assert summary["classes"] == {"unlabelled": 2, "": 1, "person": 1}
    real, none = summary["folders"]["unlabelled"], summary["folders"][""]
    assert real != none and none == "unlabelled"
    assert sorted(p.name for p in (tmp_path / "out" / real).iterdir()) == ["chelsea.jpg",
                                                                         "coffee.jpg"]
    assert sorted(p.name for p in (tmp_path / "out" / none).iterdir()) == ["rocket.jpg"]
    # without the unlabelled rows, the real label keeps its own name
    s2 = export_imagefolder(frame(rows), image_root, tmp_path / "out2", progress=False)
    assert s2["folders"] == {"unlabelled": "unlabelled", "person": "person"}


def test_imagefolder_by_cluster_and_links(image_root, tmp_path):
    """L8: --by cluster and --link are honoured by the ImageFolder export."""
    df = frame(BASIC).assign(cluster=[0, 0, 1, 1, -1, 2])
    s = export_imagefolder(df, image_root, tmp_path / "byc", by="cluster", mode="link",
                           progress=False)
    # the discarded row (cluster 2) is left out of every layout, like a duplicate not kept
    assert s["classes"] == {"cluster_0": 2, "cluster_1": 2}
    assert s["skipped_unlabelled"] == 1 and s["skipped_discard"] == 1  # the noise row, camera
    f = tmp_path / "byc" / "cluster_1" / "coffee.jpg"
    assert f.is_symlink() and f.resolve() == (image_root / "a" / "coffee.jpg").resolve()
    with pytest.raises(ValueError, match="link"):
        export_imagefolder(df, image_root, tmp_path / "z", by="cluster", mode="link",
                           as_zip=True, progress=False)


def test_non_images_and_symlinks_out_are_not_exported(image_root, tmp_path):
    """H1: a text file named .jpg and a symlink leading out of the image folder stay behind."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        (root / "a" / name).write_bytes((image_root / "a" / name).read_bytes())
    (root / "a" / "passwd.jpg").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "secret.jpg").write_bytes((image_root / "a" / "rocket.jpg").read_bytes())
    os.symlink(tmp_path / "secret.jpg", root / "a" / "leak.jpg")
    rows = [("a/chelsea.jpg", "cat"), ("a/passwd.jpg", "cat"), ("a/leak.jpg", "cat"),
            ("a/coffee.jpg", "drink")]
    s = export_imagefolder(frame(rows), root, tmp_path / "out.zip", as_zip=True, progress=False)
    assert s["images"] == 2
    assert [p for p, _ in s["refused"]] == ["a/passwd.jpg", "a/leak.jpg"]
    assert s["outside_root"] == ["a/leak.jpg"]
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        names = zf.namelist()
    assert sorted(names) == ["out/cat/chelsea.jpg", "out/drink/coffee.jpg", "out/labels.csv"]


def test_never_overwrites(image_root, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_imagefolder(frame(BASIC), image_root, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["precious.txt"]
    (tmp_path / "z.zip").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        export_imagefolder(frame(BASIC), image_root, tmp_path / "z.zip", as_zip=True,
                           progress=False)
    assert (tmp_path / "z.zip").read_bytes() == b"old"
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    export_imagefolder(frame(BASIC), image_root, tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "cat").is_dir()
    # no partial leftovers
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_hostile_labels_become_safe_distinct_folders(image_root, tmp_path):
    rows = [
        ("a/chelsea.jpg", "../../etc"),
        ("a/coffee.jpg", "Cat"),
        ("a/astronaut.jpg", "cat"),
        ("a/rocket.jpg", "CON"),
        ("b/chelsea.jpg", "labels.csv"),
        ("a/camera.jpg", 'a/b\\c:*?"<>|'),
    ]
    summary = export_imagefolder(frame(rows), image_root, tmp_path / "out", progress=False)
    folders = summary["folders"]
    assert len(set(f.lower() for f in folders.values())) == len(rows)
    for f in folders.values():
        assert "/" not in f and "\\" not in f and not f.startswith(".") and f
        assert (tmp_path / "out" / f).is_dir()
    assert folders["CON"] != "CON"
    assert (tmp_path / "out" / LABELS_CSV).is_file()  # not clobbered by the 'labels.csv' label
    # nothing written outside the export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_and_outside_paths_are_reported_not_fatal(image_root, tmp_path):
    rows = BASIC[:3] + [("a/gone.jpg", "cat"), ("../outside.jpg", "cat"),
                        ("/etc/passwd", "cat"), ("b/camera.gif", "cat")]
    summary = export_imagefolder(frame(rows), image_root, tmp_path / "out", progress=False)
    assert summary["missing"] == ["a/gone.jpg"]
    assert summary["outside_root"] == ["../outside.jpg", "/etc/passwd"]
    assert summary["not_loadable"] == ["b/camera.gif"]
    assert summary["images"] == 4


def test_nothing_to_export_and_bad_input(image_root, tmp_path):
    with pytest.raises(ValueError, match="no labelled image"):
        export_imagefolder(frame([("a/rocket.jpg", "")]), image_root, tmp_path / "o",
                           progress=False)
    with pytest.raises(ValueError, match="'label'"):
        export_imagefolder(frame(BASIC).drop(columns="label"), image_root, tmp_path / "o",
                           progress=False)
    with pytest.raises(ValueError, match="image folder not found"):
        export_imagefolder(frame(BASIC), tmp_path / "nope", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_labels_from_a_journal_end_to_end(image_root, tmp_path):
    from torchvision.datasets import ImageFolder

    df = frame([(p, "") for p, _ in BASIC])
    book = LabelBook(Journal(tmp_path / "t.labels.jsonl"), keys=df["path"])
    book.apply(["a/chelsea.jpg", "b/chelsea.jpg"], "cat")
    book.apply(["a/coffee.jpg"], "mug")
    book.rename("mug", "drink")
    reopened = LabelBook.from_journal(Journal(tmp_path / "t.labels.jsonl"))
    export_imagefolder(labelled_table(df, reopened), image_root, tmp_path / "ds", progress=False)
    ds = ImageFolder(str(tmp_path / "ds"))
    assert ds.classes == ["cat", "drink"] and len(ds) == 3
