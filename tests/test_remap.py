"""explorer.curation.remap: the targets, the sidecar beside the build, map_and_space's ``y``."""

from __future__ import annotations

import numpy as np
import pytest

from explorer.curation import remap
from explorer.stages.reduce import map_and_space


def test_targets_are_labels_then_chosen_predictions():
    labels = ["cat", "", "", "dog", ""]
    pred = ["cat", "dog", "cat", "dog", ""]
    use = [False, True, False, False, True]
    assert remap.with_predictions(labels, pred, use) == ["cat", "dog", "", "dog", ""]
    codes, classes = remap.label_targets(["cat", "", "dog"])
    assert classes == ["cat", "dog"] and codes.tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="differ in length"):
        remap.with_predictions(labels, pred[:-1], use)


def test_bad_targets_are_refused_before_any_work():
    X = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="no image has a label"):
        remap.remap(X, np.full(20, -1))
    with pytest.raises(ValueError, match="targets must be"):
        remap.remap(X, np.zeros(20, float))
    with pytest.raises(ValueError, match="y must be 20 integers"):
        map_and_space(X, y=np.zeros(19, int))


def test_the_sidecar_belongs_to_its_rows(tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text("path\n")
    keys = [f"k{i}" for i in range(5)]
    assert remap.load(csv, keys) is None  # none yet
    res = remap.Remapped(np.arange(10, dtype=np.float32).reshape(5, 2), np.zeros((5, 3), np.float32),
                         np.array([0, 0, 1, 1, -1]), 2, ["a note"], predicted=1)
    path = remap.save(csv, keys, res, ["a", "b"])
    assert path == tmp_path / "b.layout-labels.npz"
    got = remap.load(csv, keys)
    assert np.array_equal(got["xy"], res.xy) and got["cluster"].tolist() == [0, 0, 1, 1, -1]
    assert got["classes"] == ["a", "b"] and got["labelled"] == 2 and got["predicted"] == 1
    assert remap.load(csv, keys[::-1]) is None and remap.load(csv, keys[:4]) is None
    with pytest.raises(ValueError, match="differ in length"):
        remap.save(csv, keys[:4], res)


def test_remap_build_with_sure_predictions(tmp_path):
    """The option measured in bench/remap.py: sure predictions join the labels as targets."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    X = (rng.normal(size=(3, 16)) * 4)[y] + rng.normal(size=(90, 16))
    labels = [""] * 90
    for i in (0, 1, 30, 31, 60, 61):
        labels[i] = "abc"[y[i]]
    csv = tmp_path / "b.csv"
    keys = [f"k{i}" for i in range(90)]
    res = remap.remap_build(csv, X, labels, keys, predictions=True)
    assert res.labelled == 6 and res.predicted > 30
    assert remap.load(csv, keys)["predicted"] == res.predicted
