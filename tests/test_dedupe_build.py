"""The build's ``duplicate_group`` from the incremental phash index (explorer.stages.duplicates): a
re-build looks up only the new images and keeps the groups' ids."""

from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image

from explorer import table
from explorer.stages import duplicates
from tests._imagegen import photo
from tests.test_dedupe import same_partition


def _img(name: str, size=(256, 192)) -> Image.Image:
    return Image.fromarray(photo(name)).resize(size)


def _folder(root):
    root.mkdir()
    _img("chelsea").save(root / "a.jpg", quality=95)
    _img("chelsea").save(root / "a_copy.jpg", quality=40)
    _img("coffee").save(root / "b.jpg", quality=95)
    _img("coffee", (180, 135)).save(root / "b_small.jpg", quality=80)
    _img("camera").save(root / "c.png")
    _img("rocket").save(root / "d.jpg")


def test_rebuild_checks_only_new_images_and_keeps_group_ids(tmp_path, quick_build, monkeypatch):
    from explorer.stages.pipeline import build

    build = partial(build, progress=False, map_method="pca", **quick_build)
    imgs = tmp_path / "photos"
    _folder(imgs)
    csv = tmp_path / "p.csv"
    first = build(imgs, out=csv).table.set_index("path")["duplicate_group"]
    assert first["a.jpg"] >= 0 and first["a.jpg"] == first["a_copy.jpg"]
    assert first["b.jpg"] >= 0 and first["b.jpg"] == first["b_small.jpg"]
    assert first["a.jpg"] != first["b.jpg"] and first["c.png"] == first["d.jpg"] == -1
    assert table.sidecar(csv, "duplicates.npz").is_file()

    # three new images: a near-copy of a.jpg (2 % crop, smaller, re-compressed), two others
    src = _img("chelsea")
    src.crop((5, 4, 251, 188)).resize((200, 150)).save(imgs / "a_new.jpg", quality=70)
    _img("astronaut").save(imgs / "e.jpg")
    Image.fromarray(photo("rocket")[::-1]).resize((256, 192)).save(imgs / "f.jpg")
    calls = []
    real = duplicates.hamming_links

    def spy(hashes, max_distance=duplicates.DEFAULT_MAX_DISTANCE, *, start=0):
        calls.append(len(hashes) - start)  # the hashes looked up in this call
        return real(hashes, max_distance, start=start)

    monkeypatch.setattr(duplicates, "hamming_links", spy)
    again = build(imgs, out=csv).table.set_index("path")["duplicate_group"]
    assert calls == [3]  # only the three new images were looked up
    assert (again[first.index] == first).all()  # every old row keeps its group id
    assert again["a_new.jpg"] == first["a.jpg"]  # the copy joins the old group
    assert again["e.jpg"] not in set(first) - {-1}

    # the same groups as a grouping from scratch (another CSV: no index to reuse)
    calls.clear()
    fresh = build(imgs, out=tmp_path / "fresh.csv").table.set_index("path")["duplicate_group"]
    assert calls == [len(fresh)]
    assert same_partition(again[fresh.index].to_numpy(), fresh.to_numpy())

    # a removed image: the rest is regrouped as from scratch, the groups keep their ids
    (imgs / "b_small.jpg").unlink()
    gone = build(imgs, out=csv).table.set_index("path")["duplicate_group"]
    assert gone["b.jpg"] == -1 and gone["a_new.jpg"] == first["a.jpg"]


def test_build_groups_by_cnn_orb(tmp_path, quick_build):
    from explorer.stages.pipeline import build

    imgs = tmp_path / "photos"
    _folder(imgs)
    res = build(imgs, out=tmp_path / "c.csv", progress=False, map_method="pca",
                duplicates="cnn+orb", **quick_build)
    g = res.table.set_index("path")["duplicate_group"]
    assert g["a.jpg"] >= 0 and g["a.jpg"] == g["a_copy.jpg"]
    assert g["b.jpg"] >= 0 and g["b.jpg"] == g["b_small.jpg"] != g["a.jpg"]
    assert g["c.png"] == g["d.jpg"] == -1
    assert not table.sidecar(tmp_path / "c.csv", "duplicates.npz").exists()
