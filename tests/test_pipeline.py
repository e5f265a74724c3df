"""End to end: `explorer build` on generated folders, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from explorer import table
from explorer.cli import main as cli

SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


def _source(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def make_folder(root: Path, per_source: int = 6, sources=SOURCES, seed: int = 0) -> list[Path]:
    """Families of crops/flips of a few sample photos, in subfolders, as JPEG and PNG."""
    rng = np.random.default_rng(seed)
    out = []
    for name in sources:
        src = _source(name)
        w, h = src.size
        for i in range(per_source):
            s = rng.uniform(0.6, 0.95)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = src.crop((x0, y0, x0 + cw, y0 + ch))
            if i % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.thumbnail((200, 200))
            p = root / name / f"img{i}.{'png' if i % 3 == 0 else 'jpg'}"
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p)
            out.append(p)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (default model, real weights) shared by the checks below."""
    base = tmp_path_factory.mktemp("e2e")
    imgs = base / "photos"
    make_folder(imgs)
    # bad files that must be skipped and listed, never stop the run
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "notes.txt").write_text("not an image, and not an image extension either")
    good = imgs / "astronaut" / "img1.jpg"
    (imgs / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    # two files called a.jpg in different folders, and a hostile name
    for sub in ["one", "two"]:
        (imgs / sub).mkdir()
        _source("coffee").resize((120, 80)).save(imgs / sub / "a.jpg")
    _source("chelsea").resize((90, 60)).save(imgs / "<img src=x onerror=alert(1)>.jpg")
    app = base / "photos_app"
    code = cli(["build", str(imgs), "--app", str(app), "-q"])
    assert code == 0
    return base, imgs, app, base / "photos_app.csv"


def test_build_writes_csv_app_thumbnails_and_run_record(built):
    base, imgs, app, csv = built
    df = table.read_table(csv)
    assert df.attrs["problems"] == []
    assert len(df) == 5 * 6 + 3  # every readable image, none of the bad files
    assert set(df["path"]).issuperset({"one/a.jpg", "two/a.jpg", "<img src=x onerror=alert(1)>.jpg"})
    # thumbnails: one per row, distinct, small, inside the app's static folder
    thumbs = [app / p for p in df["image"]]
    assert len(set(df["image"])) == len(df)
    assert all(t.is_file() and t.resolve().is_relative_to(app / "static") for t in thumbs)
    assert max(max(Image.open(t).size) for t in thumbs) <= 256
    # app folder is a Bokeh directory app
    assert (app / "main.py").is_file()
    # sizes are the originals', not the thumbnails'
    row = df.set_index("path").loc["one/a.jpg"]
    assert (row["width"], row["height"]) == (120, 80)
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["counts"]["rows"] == len(df) and run["counts"]["skipped"] == 3
    assert run["image_dir"] == str(imgs.resolve())
    assert "torch" in run["versions"] and "timm" in run["versions"]
    assert {"discover", "embed", "map", "cluster", "write"} <= set(run["timings"])
    feats = np.load(table.sidecar(csv, "features.npy"))
    assert feats.shape[0] == len(df)


def test_bad_files_are_listed_with_reasons(built):
    _, _, _, csv = built
    errs = pd.read_csv(table.sidecar(csv, "errors.csv"))
    assert set(errs["path"]) == {"broken.jpg", "empty.png", "truncated.jpg"}
    assert errs["reason"].str.len().min() > 3


def test_map_and_clusters_separate_the_photo_families(built):
    _, _, _, csv = built
    df = table.read_table(csv)
    fam = df["path"].str.split("/").str[0]
    mask = fam.isin(SOURCES)
    assert np.isfinite(df[["x", "y"]].to_numpy()).all()
    # images of one source lie closer to each other than to other sources on the map
    xy = df.loc[mask, ["x", "y"]].to_numpy()
    f = fam[mask].to_numpy()
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = (f[:, None] == f[None]) & ~np.eye(len(f), dtype=bool)
    assert d[same].mean() < 0.5 * d[~(f[:, None] == f[None])].mean()
    assert df["probability"].between(0, 1).all() and df["outlier_score"].between(0, 1).all()


def test_second_run_embeds_only_new_images(built, tmp_path):
    base, imgs, app, csv = built
    extra = base / "photos" / "new"
    extra.mkdir(exist_ok=True)
    for i in range(3):
        _source("rocket").rotate(90 * i, expand=True).resize((100, 70)).save(extra / f"n{i}.jpg")
    from explorer.pipeline import build

    res = build(imgs, app=app, progress=False)
    assert res.run["counts"]["cached"] == len(res.table) - 3
    assert len(res.table) == 5 * 6 + 3 + 3


def test_duplicates_are_grouped(tmp_path):
    imgs = tmp_path / "dups"
    imgs.mkdir()
    src = _source("astronaut").resize((256, 256))
    src.save(imgs / "a.jpg", quality=95)
    src.save(imgs / "a_recompressed.jpg", quality=50)
    _source("coffee").resize((256, 170)).save(imgs / "b.jpg")
    _source("camera").resize((200, 200)).save(imgs / "c.png")
    from explorer.pipeline import build

    df = build(imgs, out=tmp_path / "d.csv", progress=False).table.set_index("path")
    g = df["duplicate_group"]
    assert g["a.jpg"] >= 0 and g["a.jpg"] == g["a_recompressed.jpg"]
    assert g["b.jpg"] == -1 and g["c.png"] == -1


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tiny_folders_still_give_a_valid_csv(tmp_path, n):
    imgs = tmp_path / "tiny"
    make_folder(imgs, per_source=1, sources=SOURCES[:n])
    from explorer.pipeline import build

    res = build(imgs, out=tmp_path / "t.csv", progress=False)
    df = table.read_table(res.csv_path)
    assert len(df) == n and np.isfinite(df[["x", "y"]].to_numpy()).all()


def test_identical_images_give_a_valid_csv(tmp_path):
    imgs = tmp_path / "same"
    imgs.mkdir()
    for i in range(6):
        _source("coins").save(imgs / f"c{i}.png")
    from explorer.pipeline import build

    res = build(imgs, out=tmp_path / "t.csv", progress=False)
    df = table.read_table(res.csv_path)
    assert len(df) == 6 and np.isfinite(df[["x", "y"]].to_numpy()).all()
    assert df["duplicate_group"].nunique() == 1 and df["duplicate_group"].iloc[0] >= 0


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli(["build", str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv"), "-q"])
    assert code == 1
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()


def test_folder_of_only_bad_files_is_a_clear_error(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.jpg").write_text("nope")
    code = cli(["build", str(d), "--out", str(tmp_path / "b.csv"), "-q"])
    assert code == 1
    assert "could be read" in capsys.readouterr().err
    assert table.sidecar(tmp_path / "b.csv", "errors.csv").is_file()


def test_missing_folder_and_bad_options(tmp_path, capsys):
    assert cli(["build", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "i").mkdir()
    assert cli(["build", str(tmp_path / "i"), "--out", str(tmp_path / "x.txt")]) == 1
    assert ".csv" in capsys.readouterr().err
    assert cli(["build", str(tmp_path / "i")]) == 1
    assert "--app" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("explorer")
    out = subprocess.run([str(exe), "build", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--app" in out.stdout
