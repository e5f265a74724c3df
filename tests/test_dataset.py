"""One reader of a build (``explorer.open``): the labels as every consumer sees them (the CSV's
own, then the journal's edits) and each file's one name."""

import numpy as np
import pytest

import explorer
from explorer import table


@pytest.fixture
def tiny(tmp_path):
    n = 4
    df = table.make_table(paths=[f"p{i}.jpg" for i in range(n)], images=[""] * n,
                          xy=np.zeros((n, 2)), cluster=np.zeros(n, int), probability=np.ones(n),
                          outlier_score=np.zeros(n), width=[8] * n, height=[8] * n)
    df["label"] = ["cat", "", "dog", ""]
    csv = tmp_path / "b.csv"
    table.write_table(df, csv)
    return csv


def test_the_label_book_starts_from_the_csv_and_follows_the_journal(tiny):
    build = explorer.open(tiny)
    assert build.keys == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert build.initial_labels() == {"p0.jpg": "cat", "p2.jpg": "dog"}
    # no journal yet: the table as written
    assert not build.labels_path.exists()
    assert build.labelled_table()["label"].tolist() == ["cat", "", "dog", ""]
    book = build.label_book("s1")
    book.apply(["p1.jpg", "p2.jpg"], "bird")
    assert build.labels_path.exists()
    # a later reader (another process: the CLI, the service, the app) sees the edit
    again = explorer.open(tiny)
    assert again.labelled_table("s2")["label"].tolist() == ["cat", "bird", "bird", ""]
    assert again.label_book("s2").counts() == {"cat": 1, "bird": 2}


def test_each_file_of_a_build_has_one_name(tiny):
    build = explorer.open(tiny)
    names = {k: getattr(build, f"{k}_path").name
             for k in ("run", "features", "concepts", "layout", "labels", "store", "errors")}
    assert names == {"run": "b.run.json", "features": "b.features.npy",
                     "concepts": "b.concepts.npz", "layout": "b.layout.npz",
                     "labels": "b.labels.sqlite", "store": "b.store", "errors": "b.errors.csv"}
    assert build.journal().path == build.labels_path


def test_the_app_project_reads_through_the_build(tiny):
    from explorer.app.project import load_project

    np.save(table.sidecar(tiny, "features.npy"), np.ones((4, 3), np.float16))
    project = load_project(tiny)
    assert project.build.csv_path == tiny.resolve()
    assert project.features is not None and project.features.shape == (4, 3)
