"""The other CLI paths a user takes: classic methods, threshold plot, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from explorer import table
from explorer.cli import main as cli

SOURCES = ["astronaut", "chelsea", "coffee", "rocket"]


def families(root: Path) -> Path:
    """Four near-duplicate families: resized, recompressed and brightened copies."""
    import skimage.data

    for name in SOURCES:
        src = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        src.thumbnail((240, 240))
        d = root / name
        d.mkdir(parents=True)
        src.save(d / "orig.png")
        src.resize((src.width * 3 // 4, src.height * 3 // 4)).save(d / "small.png")
        src.save(d / "jpeg.jpg", quality=55)
        ImageEnhance.Brightness(src).enhance(1.1).save(d / "bright.png")
    return root


@pytest.fixture(scope="module")
def phash_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("classic")
    imgs = families(base / "imgs")
    assert cli(["build", str(imgs), "--app", str(base / "fam"), "--method", "phash", "-q"]) == 0
    return base, imgs, base / "fam.csv"


def test_classic_method_groups_each_family(phash_build):
    _, _, csv = phash_build
    df = table.read_table(csv)
    fam = df["path"].str.split("/").str[0]
    for name in SOURCES:
        ids = set(df.loc[fam == name, "cluster"])
        assert len(ids) == 1 and -1 not in ids, (name, ids)
    assert df.groupby(fam)["cluster"].first().nunique() == len(SOURCES)
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["parameters"]["method"] == "phash"
    assert (csv.parent / "fam" / "main.py").is_file()


def test_export_writes_cluster_folders_and_sample(phash_build, tmp_path):
    _, _, csv = phash_build
    out = tmp_path / "out"
    assert cli(["export", str(csv), "--to", str(out), "--sample", "25%", "-q"]) == 0
    clusters = sorted(p.name for p in out.iterdir() if p.name.startswith("cluster_"))
    assert len(clusters) == len(SOURCES)
    assert sum(len(list((out / c).iterdir())) for c in clusters) == 4 * len(SOURCES)
    assert len([p for p in (out / "sample").rglob("*") if p.is_file()]) >= len(SOURCES)
    # never overwrites: a second export into the same folder is refused
    assert cli(["export", str(csv), "--to", str(out), "-q"]) == 1


def test_export_needs_to_know_where_images_are(phash_build, tmp_path, capsys):
    _, _, csv = phash_build
    lone = tmp_path / "lone.csv"
    lone.write_text(csv.read_text())
    assert cli(["export", str(lone), "--to", str(tmp_path / "o"), "-q"]) == 1
    assert "--images" in capsys.readouterr().err


def test_threshold_plot_is_written(phash_build, tmp_path, capsys):
    _, imgs, _ = phash_build
    out = tmp_path / "thr.html"
    assert cli(["threshold", str(imgs), "--method", "phash", "--out", str(out), "-q"]) == 0
    html = out.read_text()
    assert "Bokeh" in html and "n_pairs" in html
    assert "default for phash" in capsys.readouterr().out
    # the curve it plots: fewer similar pairs as the threshold rises; at the default the
    # 4 copies of each photo (6 pairs per family) are linked, other families mostly not
    from explorer.stages import images, similarity

    curve = similarity.threshold_curve(images.discover(imgs), "phash", sample=None,
                                       progress=False)
    assert (curve["n_pairs"].diff().dropna() <= 0).all()
    at = curve.iloc[(curve["threshold"] - similarity.DEFAULT_THRESHOLDS["phash"]).abs().argmin()]
    assert 6 * len(SOURCES) <= at["n_pairs"] < 120


def test_export_with_missing_columns_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,x\na.jpg,1\n")
    assert cli(["export", str(bad), "--to", str(tmp_path / "o")]) == 1
    assert "missing column" in capsys.readouterr().err


def test_cluster_choice_kmeans_writes_elbow_plot(tmp_path, quick_build):
    """(The tiny model in this process: the test is about the clustering's options; the
    command line's --k is read by the one options schema, tests/test_options.py.)"""
    from explorer.stages.pipeline import build

    imgs = families(tmp_path / "imgs")
    csv = tmp_path / "k.csv"
    build(imgs, out=csv, cluster="kmeans", progress=False, **quick_build)
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["clustering"]["method"] == "kmeans"
    assert table.sidecar(csv, "elbow.html").is_file()
    build(imgs, out=csv, cluster="kmeans", k=4, progress=False, **quick_build)
    assert table.read_table(csv)["cluster"].nunique() == 4


def test_build_shows_one_progress_display_with_every_stage(tmp_path, capsys):
    """Without -q: the rich display (stage, count, time) and the summary, on stderr."""
    imgs = families(tmp_path / "imgs")
    assert cli(["build", str(imgs), "--out", str(tmp_path / "p.csv"), "--method", "phash",
                "--map", "pca"]) == 0
    err = capsys.readouterr().err
    run = json.loads(table.sidecar(tmp_path / "p.csv", "run.json").read_text())
    for stage in set(run["timings"]) - {"total"}:
        assert f"{stage} " in err, (stage, err)
    assert "phash features" in err and "16/16" in err  # a count from inside a stage
    assert "rows written" in err  # the summary
