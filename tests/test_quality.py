"""Quality statistics of a thumbnail and the flags made from them (no second decode)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from explorer.stages import quality as Q
from tests import _collections as col


def _thumb(a: np.ndarray, size: int = 256) -> Image.Image:
    img = Image.fromarray(a)
    img.thumbnail((size, size))
    return img


@pytest.fixture(scope="module")
def cases():
    """name -> (thumbnail, (width, height)) for images a person would call ... ."""
    photos, _ = col.photos(2, sources=("chelsea", "coffee"), size=256, seed=2)
    sharp = photos[0]
    out = {
        "sharp": (sharp, (256, 256)),
        "other": (photos[2], (256, 256)),
        "blurry": (np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(6))),
                   (256, 256)),
        "dark": ((sharp * 0.15).astype(np.uint8), (256, 256)),
        "bright": (np.clip(sharp.astype(int) + 200, 0, 255).astype(np.uint8), (256, 256)),
        "blank": (np.full((256, 200, 3), 240, np.uint8), (200, 256)),
        "grey": (np.repeat(sharp.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8),
                 (256, 256)),
        "wide": (sharp[:64], (1200, 300)),
        "huge": (sharp, (4000, 4000)),
        "tiny": (sharp, (24, 24)),
    }
    return out


def _flags(cases, hashes=None):
    names = list(cases)
    stats = np.stack([Q.image_stats(_thumb(a)) for a, _ in cases.values()])
    w = [s[0] for _, s in cases.values()]
    h = [s[1] for _, s in cases.values()]
    df = Q.flags(stats, w, h, hashes or [f"h{i}" for i in range(len(names))])
    df.index = names
    return df


def test_each_problem_image_gets_its_flag_and_a_good_photo_none(cases):
    df = _flags(cases)
    assert list(df.columns) == list(Q.FLAG_NAMES)
    assert not df.loc["sharp"].any() and not df.loc["other"].any()
    expect = {"blurry": "blurry", "dark": "dark", "bright": "bright", "blank": "low_information",
              "grey": "grayscale", "wide": "odd_aspect", "huge": "odd_size", "tiny": "odd_size"}
    for name, flag in expect.items():
        assert df.loc[name, flag], (name, flag, df.loc[name].to_dict())
    # a blank page is low information, not also blurry; a dark photo is not bright
    assert not df.loc["blank", "blurry"] and not df.loc["dark", "bright"]
    # every flag but exact_duplicate fires somewhere, and none fires on everything
    assert df.drop(columns="exact_duplicate").any().all()
    assert not df.all().any()


def test_exact_duplicates_keep_the_first_copy_unflagged(cases):
    hashes = ["a", "b", "a", "c", "a", "b", "", "", "d", "e"]
    df = _flags(cases, hashes)
    assert df["exact_duplicate"].tolist() == [False, False, True, False, True, True,
                                              False, False, False, False]


def test_thresholds_can_be_changed_and_bad_input_is_named():
    stats = np.array([[0.5, 0, 0, 10.0, 6.0, 0.2]], np.float32)
    assert Q.flags(stats, [100], [100], ["x"])["blurry"].item()
    assert not Q.flags(stats, [100], [100], ["x"], {"blurry_sharpness": 5})["blurry"].item()
    with pytest.raises(ValueError, match="'sharp'"):
        Q.flags(stats, [100], [100], ["x"], {"sharp": 1})
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        Q.flags(stats[:, :3], [100], [100], ["x"])
    with pytest.raises(ValueError, match="width has 2"):
        Q.flags(stats, [100, 3], [100], ["x"])


def test_image_stats_keeps_its_signature_and_names():
    v = Q.image_stats(np.zeros((8, 8, 3), np.uint8))
    assert v.shape == (len(Q.STAT_NAMES),) and v.dtype == np.float32
    with pytest.raises(ValueError, match="HxWx3"):
        Q.image_stats(np.zeros((8,), np.uint8))


def test_export_drop_leaves_out_flagged_images(tmp_path, capsys):
    import json

    from explorer import table
    from explorer.cli import main

    names = ["a.png", "b.png", "c.png", "d.png"]
    for i, n in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / n)
    df = table.make_table(paths=names, images=[""] * 4, xy=np.zeros((4, 2)),
                          cluster=[0, 0, 1, 1], probability=np.ones(4),
                          outlier_score=np.zeros(4), width=[8] * 4, height=[8] * 4)
    df["blurry"] = [1, 0, 0, 0]
    df["exact_duplicate"] = [0, 0, 1, 0]
    table.write_table(df, tmp_path / "t.csv")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "t.csv"), "--to", str(out), "--images", str(tmp_path),
                 "--drop", "blurry,exact_duplicate", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dropped_by_flag"] == {"blurry": 1, "exact_duplicate": 1}
    written = sorted(p.name for p in out.rglob("*.png"))
    assert written == ["b.png", "d.png"]
    assert main(["export", str(tmp_path / "t.csv"), "--to", str(tmp_path / "o2"),
                 "--images", str(tmp_path), "--drop", "fuzzy"]) == 1
    assert "'fuzzy'" in capsys.readouterr().err
