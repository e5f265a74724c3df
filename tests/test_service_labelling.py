"""labels next / propagate / accept through the service, on a dataset whose build files are
written by the test (three well-separated groups of stored vectors; no model is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402
from _service import Local, grant, local_user  # noqa: E402

from explorer.curation.journal import Journal, journal_for  # noqa: E402
from explorer.table import make_table, sidecar, write_table  # noqa: E402


@pytest.fixture()
def site(tmp_path):
    root = tmp_path / "root"
    image_folder(root / "photos", 6, size=32)
    data = tmp_path / "data"
    token = local_user(data, "alice", projects=("p1",))
    grant(data, "photos", user="alice")  # the access model: folders outside users/NAME are granted
    with Local(root, data) as service:
        c = service.client(token)
        r = c.post("/api/datasets", json={"name": "photos", "folder": "photos"})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        yield c, ds, data / "datasets" / ds / "app.csv"


def fake_build(csv: Path):
    """What a build leaves that these routes read: the table and the stored vectors."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    paths = [f"g{c}/img{i:02d}.jpg" for i, c in enumerate(y)]
    n = len(paths)
    df = make_table(paths, [""] * n, rng.normal(size=(n, 2)), np.zeros(n, int), np.ones(n),
                    np.zeros(n), [8] * n, [8] * n)
    csv.parent.mkdir(parents=True, exist_ok=True)
    write_table(df, csv)
    X = (rng.normal(size=(3, 24)) * 3)[y] + rng.normal(size=(n, 24))
    np.save(sidecar(csv, "features.npy"), X.astype(np.float16))
    return paths, y


def test_next_propagate_accept_through_the_api(site):
    c, ds, csv = site
    assert c.get(f"/api/datasets/{ds}/labels/next").status_code == 409  # not built yet
    paths, y = fake_build(csv)
    r = c.get(f"/api/datasets/{ds}/labels/next", params={"n": 3})
    assert r.status_code == 200, r.text
    picks = r.json()["next"]
    assert len(picks) == 3 and all(p["reason"] for p in picks)
    assert sorted(p["path"].split("/")[0] for p in picks) == ["g0", "g1", "g2"]
    keys = [p["path"] for p in picks]
    r = c.post(f"/api/datasets/{ds}/labels", json={"op": "apply", "keys": keys[:1],
                                                   "label": keys[0][:2]})
    for k in keys[1:]:
        c.post(f"/api/datasets/{ds}/labels", json={"op": "apply", "keys": [k], "label": k[:2]})
    r = c.get(f"/api/datasets/{ds}/labels/propagate")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["labels"] == 3 and res["estimated_accuracy"] > 0.9
    rows = res["rows"]
    assert len(rows) == len(paths)
    right = [row["predicted_label"] == row["path"][:2] for row in rows]
    assert np.mean(right) > 0.95
    n_sure = res["sure"]
    # what "sure" means can be asked for: stricter, fewer (never more) sure predictions
    strict = c.get(f"/api/datasets/{ds}/labels/propagate",
                   params={"rows": False, "sure": 0.999}).json()
    assert strict["sure_precision"] == 0.999 and res["sure_precision"] == 0.97
    assert strict["sure"] <= n_sure and (strict["threshold"] or 1) >= res["threshold"]
    for bad in (0.3, 1.5, "x"):
        assert c.get(f"/api/datasets/{ds}/labels/propagate",
                     params={"rows": False, "sure": bad}).status_code == 422
        assert c.post(f"/api/datasets/{ds}/labels/accept", params={"sure": bad}).status_code == 422
    r = c.post(f"/api/datasets/{ds}/labels/accept")
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == n_sure > 0
    ops = [rec["op"] for rec in Journal(journal_for(csv).path).replay()]
    assert ops[-1] == "accept"
    res2 = c.get(f"/api/datasets/{ds}/labels/propagate", params={"rows": False}).json()
    assert res2["accepted"] == n_sure and res2["labels"] == 3 and "rows" not in res2
    assert c.get(f"/api/datasets/{ds}/labels/next", params={"n": 0}).status_code == 422
