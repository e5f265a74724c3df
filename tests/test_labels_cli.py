"""`explorer labels add/next/propagate/accept` and `export --by label --min-confidence` on a
small build (a table and stored vectors in three well-separated groups)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explorer.cli import main
from explorer.curation.journal import Journal, journal_for
from explorer.table import make_table, sidecar, write_json, write_table
from tests import _imagegen

GROUPS = ("red", "green", "blue")
PER_GROUP = 40


@pytest.fixture()
def small_build(tmp_path):
    """NAME.csv + NAME.features.npy + images: 3 groups of 40, none labelled."""
    rng = np.random.default_rng(0)
    paths, y = [], []
    images = tmp_path / "images"
    for g, name in enumerate(GROUPS):
        for i in range(PER_GROUP):
            rel = f"{name}/{name}{i:02d}.png"
            colour = np.zeros((8, 8, 3), np.uint8)
            colour[..., g] = 200
            _imagegen.save(colour, images / rel)
            paths.append(rel)
            y.append(g)
    y = np.asarray(y)
    n = len(paths)
    df = make_table(paths, [""] * n, rng.normal(size=(n, 2)), np.zeros(n, int),
                    np.ones(n), np.zeros(n), [8] * n, [8] * n)
    csv = tmp_path / "small.csv"
    write_table(df, csv)
    write_json(sidecar(csv, "run.json"), {"image_dir": str(images)})
    centres = rng.normal(size=(3, 32)) * 3
    X = centres[y] + rng.normal(size=(n, 32))
    np.save(sidecar(csv, "features.npy"), X.astype(np.float16))
    return csv, paths, y


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_add_next_propagate_accept_and_export(small_build, tmp_path, capsys):
    csv, paths, y = small_build
    # next, before any label: one image of every group (coverage), with a reason
    rc, out, _ = run(capsys, "labels", "next", csv, "--n", "3", "--json")
    assert rc == 0
    picks = json.loads(out)
    assert len(picks) == 3 and all(p["reason"] for p in picks)
    assert sorted(p["path"].split("/")[0] for p in picks) == sorted(GROUPS)
    # the person labels them (and two more) from a CSV: one journal step
    lab = tmp_path / "mine.csv"
    chosen = [p["path"] for p in picks] + [paths[1], paths[PER_GROUP + 1]]
    pd.DataFrame({"path": chosen, "label": [c.split("/")[0] for c in chosen]}).to_csv(lab, index=False)
    # the coverage picks run on the rows smoothed over the neighbour graph (as the bench's):
    # the first next made the graph and keeps it beside the build
    graph = sidecar(csv, "labelling-graph.npy")
    assert graph.exists()
    made = graph.stat().st_mtime_ns
    rc, out, _ = run(capsys, "labels", "add", csv, "--from", lab)
    assert rc == 0 and "added 5 labels" in out
    # with labels of several groups, next picks from the model smoothed over that graph (as
    # propagate does), read back, not made again
    assert run(capsys, "labels", "next", csv, "--n", "20", "--json")[0] == 0
    assert graph.stat().st_mtime_ns == made
    assert [r["op"] for r in Journal(journal_for(csv).path).replay()] == ["assign"]
    # propagate: every row predicted, with a confidence and where its label comes from
    out_csv = tmp_path / "pred.csv"
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--out", out_csv, "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["labels"] == 5 and res["estimated_accuracy"] > 0.9
    rows = pd.DataFrame(res["rows"])
    assert len(rows) == len(paths)
    assert set(rows["label_source"]) == {"person", "predicted"}
    truth = np.array(GROUPS)[y]
    assert (rows["predicted_label"].to_numpy() == truth).mean() > 0.95
    assert rows["confidence"].between(0, 1).all() and rows["sure"].sum() > 50
    assert pd.read_csv(out_csv)["predicted_label"].tolist() == rows["predicted_label"].tolist()
    # the model's rows are kept beside the build for the next call
    cached = sidecar(csv, "labelling.npy")
    assert np.load(cached).shape == (len(paths), 32)
    # next, now: unlabelled images, said to be unsure between two labels
    rc, out, _ = run(capsys, "labels", "next", csv, "--n", "4", "--json")
    picks2 = json.loads(out)
    assert {p["path"] for p in picks2}.isdisjoint(chosen)
    assert all("unsure between" in p["reason"] or "no label covers" in p["reason"] for p in picks2)
    # accept every sure prediction: one step, kept apart from the hand labels
    rc, out, _ = run(capsys, "labels", "accept", csv)
    assert rc == 0 and "accepted" in out
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--json")
    res2 = json.loads(out)
    assert res2["labels"] == 5 and res2["accepted"] == int(rows["sure"].sum())
    ops = [r["op"] for r in Journal(journal_for(csv).path).replay()]
    assert ops == ["assign", "accept"]
    # export by label takes predictions above a confidence; without it only labels
    rc, out, _ = run(capsys, "export", csv, "--to", tmp_path / "byl", "--by", "label",
                     "--min-confidence", "0.0", "-q")
    assert rc == 0
    summary = json.loads(out)
    assert sum(v for k, v in summary["folders"].items() if k in GROUPS) == len(paths)


def test_propagate_keeps_the_neighbour_graph_and_redoes_a_bad_one(small_build, tmp_path,
                                                                   capsys, monkeypatch):
    """The graph (minutes at 200,000 rows) is made once per build: a second propagate reads
    it from NAME.labelling-graph.npy; a tampered file is made again, never trusted."""
    from explorer.curation import active

    csv, paths, y = small_build
    lab = tmp_path / "mine.csv"
    chosen = [paths[0], paths[1], paths[PER_GROUP], paths[2 * PER_GROUP]]
    pd.DataFrame({"path": chosen, "label": [c.split("/")[0] for c in chosen]}).to_csv(lab, index=False)
    assert run(capsys, "labels", "add", csv, "--from", lab)[0] == 0
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--json")
    first = json.loads(out)
    cached = sidecar(csv, "labelling-graph.npy")
    graph = np.load(cached)
    assert graph.shape == (len(paths), active.NEIGHBOURS + 1)

    made = []
    real = active.neighbours
    monkeypatch.setattr(active, "neighbours", lambda X: made.append(1) or real(X))
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--json")
    assert rc == 0 and made == [] and json.loads(out) == first
    # the rows smoothed over the graph are kept beside it too (seconds at 200,000 rows)
    smoothed = sidecar(csv, "labelling-smoothed.npy")
    np.testing.assert_array_equal(np.load(smoothed), active.smooth_rows(np.load(sidecar(csv, "labelling.npy")), graph))
    smooths = []
    monkeypatch.setattr(active, "smooth_rows", lambda *a, _real=active.smooth_rows: smooths.append(1) or _real(*a))
    assert run(capsys, "labels", "next", csv, "--json")[0] == 0
    assert run(capsys, "labels", "propagate", csv, "--json")[1] == out and smooths == []
    np.save(smoothed, np.load(smoothed)[:, :3])  # the wrong shape: made again
    assert run(capsys, "labels", "propagate", csv, "--json")[1] == out and smooths == [1]
    bad = graph.copy()
    bad[0, 1] = 10 ** 6  # a row that does not exist
    np.save(cached, bad)
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--json")
    assert rc == 0 and made == [1] and json.loads(out) == first
    assert (np.load(cached) == graph).all()


def test_bad_input_is_a_clear_error(small_build, tmp_path, capsys):
    csv, paths, _ = small_build
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["nope.png"], "label": ["x"]}).to_csv(bad, index=False)
    rc, _, err = run(capsys, "labels", "add", csv, "--from", bad)
    assert rc == 1 and "not in" in err and "nope.png" in err
    pd.DataFrame({"file": ["a"]}).to_csv(bad, index=False)
    rc, _, err = run(capsys, "labels", "add", csv, "--from", bad)
    assert rc == 1 and "path,label" in err
    rc, _, err = run(capsys, "export", csv, "--to", tmp_path / "x", "--min-confidence", "0.9")
    assert rc == 2 and "--by label" in err
    # no labels yet: propagate says so instead of guessing
    rc, out, _ = run(capsys, "labels", "propagate", csv, "--json")
    res = json.loads(out)
    assert rc == 0 and res["estimated_accuracy"] is None and res["sure"] == 0
    # what "sure" means must be a share of right predictions a person can ask for
    for cmd in ("propagate", "accept"):
        rc, _, err = run(capsys, "labels", cmd, csv, "--sure", "1.5")
        assert rc == 1 and "sure precision must be between 0.5 and 0.999" in err and "1.5" in err


def test_sure_asks_for_stricter_predictions(small_build, tmp_path, capsys):
    """`--sure 0.995`: the sure predictions expected that right, so fewer (never more) of
    them, at a higher threshold; accept takes the same set and records what was asked."""
    csv, paths, _ = small_build
    lab = tmp_path / "mine.csv"
    chosen = [paths[0], paths[1], paths[PER_GROUP], paths[2 * PER_GROUP]]
    pd.DataFrame({"path": chosen, "label": [c.split("/")[0] for c in chosen]}).to_csv(lab, index=False)
    assert run(capsys, "labels", "add", csv, "--from", lab)[0] == 0
    usual = json.loads(run(capsys, "labels", "propagate", csv, "--json")[1])
    strict = json.loads(run(capsys, "labels", "propagate", csv, "--json", "--sure", "0.995")[1])
    assert usual["sure_precision"] == 0.97 and strict["sure_precision"] == 0.995
    assert 0 < strict["sure"] < usual["sure"] and strict["threshold"] > usual["threshold"]
    strict_rows = {r["path"] for r in strict["rows"] if r["sure"]}
    rc, out, _ = run(capsys, "labels", "accept", csv, "--sure", "0.995")
    assert rc == 0 and f"accepted {strict['sure']} sure predictions" in out
    rec = list(Journal(journal_for(csv).path).replay())[-1]
    assert rec["op"] == "accept" and rec["args"]["sure_precision"] == 0.995
    assert {k for g in rec["args"]["changes"] for k in g[2]} == strict_rows


def test_remap_writes_the_layout_beside_the_original(small_build, tmp_path, capsys):
    """`explorer labels remap`: NAME.layout-labels.npz (what the app's switch shows), the
    CSV untouched; without labels a clear error and no file."""
    from explorer.curation import remap

    csv, paths, y = small_build
    rc, _, err = run(capsys, "labels", "remap", csv)
    assert rc != 0 and "label some images first" in err
    assert not remap.sidecar_path(csv).exists()
    labels = tmp_path / "labels.csv"
    pick = [0, 1, PER_GROUP, PER_GROUP + 1, 2 * PER_GROUP, 2 * PER_GROUP + 1]
    pd.DataFrame({"path": [paths[i] for i in pick],
                  "label": [GROUPS[y[i]] for i in pick]}).to_csv(labels, index=False)
    assert run(capsys, "labels", "add", csv, "--from", labels)[0] == 0
    before = csv.read_bytes()
    rc, out, err = run(capsys, "labels", "remap", csv)
    assert rc == 0, err
    assert "layout-labels.npz" in out and "6 labelled" in out
    assert csv.read_bytes() == before
    lay = remap.load(csv, paths)
    assert lay is not None and lay["xy"].shape == (len(paths), 2)
    assert lay["classes"] == sorted(GROUPS) and lay["labelled"] == 6
    # the clusters of the new layout never mix the groups (HDBSCAN may split one)
    from sklearn.metrics import homogeneity_score

    assert homogeneity_score(y, lay["cluster"]) > 0.95
    # a layout of other rows is not offered
    assert remap.load(csv, paths[::-1]) is None
