"""explorer build --engine ray: a local Ray gives the local engine's vectors (one CPU: each Ray
worker is a process of its own; with two the file cost 55.6 instead of 48.4 CPU s here)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import _imagegen as gen
except ImportError:  # tests/ made a package
    from tests import _imagegen as gen

pytestmark = pytest.mark.slow  # a local Ray cluster (make test-fast leaves it out)


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_gives_the_local_vectors_and_fills_the_same_store(local_ray, tmp_path):
    from explorer.stages.embed import embed_paths

    paths = gen.image_folder(tmp_path / "imgs", 40, size=100)
    bad = gen.truncated(tmp_path / "imgs" / "bad.jpg")
    paths.append(bad)
    from explorer.stages.pipeline import ThumbSink  # picklable: Ray workers import it

    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    sink = ThumbSink(thumbs, [f"t{i}.jpg" for i in range(len(paths))])
    kw = dict(precision="float32", jit=False, progress=False)
    local = embed_paths(paths, **kw)
    rr = embed_paths(paths, engine="ray", store=tmp_path / "store", sink=sink, **kw)
    assert rr.ok.tolist() == local.ok.tolist() and len(rr.ok) == 40
    assert [e[1] for e in rr.errors] == ["truncated file"]
    a, b = local.embeddings, rr.embeddings
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999
    assert rr.width.tolist() == local.width.tolist() and (rr.phash == local.phash).all()
    assert len(list(thumbs.glob("*.jpg"))) == 40  # the Ray tasks wrote the thumbnails
    # what Ray computed is in the store: the local engine now decodes nothing
    again = embed_paths(paths, store=tmp_path / "store", sink=sink, **kw)
    assert again.n_decoded == 0 and again.n_cached == 40
    np.testing.assert_array_equal(again.embeddings, rr.embeddings)


def test_build_with_engine_ray_writes_the_csv(local_ray, tmp_path):
    from explorer import table
    from explorer.cli import main as cli

    gen.image_folder(tmp_path / "imgs", 30, size=100)
    csv = tmp_path / "r.csv"
    assert cli(["build", str(tmp_path / "imgs"), "--out", str(csv), "--engine", "ray",
                "--device", "cpu", "-q", "--seed", "1"]) == 0
    df = table.read_table(csv)
    assert len(df) == 30 and np.isfinite(df[["x", "y"]].to_numpy()).all()
    import json

    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["execution"]["engine"] == "ray" and run["counts"]["decoded"] == 30
