"""A served build's progress: the job queue runs the real worker process (as ``explorer
serve`` does), the build embeds in its own child process, and the job row's progress,
polled, rises all through the embedding.

Broken on purpose once: without the child's events (``forward_to`` not installed in
``pipeline._embed_child``) the progress stands still during "embed" and the test fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from explorer.options import build_request_model
from explorer.service.db import DB, dataset_dir
from explorer.service.jobs import JobQueue

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402

pytestmark = pytest.mark.slow  # served builds with the real model (make test-fast leaves it out)


N_IMAGES = 200


def test_a_served_build_reports_progress_all_through_the_embedding(tmp_path):
    folder = tmp_path / "root" / "photos"
    image_folder(folder, N_IMAGES, size=48)
    db = DB(tmp_path / "data" / "service.db")
    db.add_user("u")
    uid = db.one("SELECT id FROM users WHERE name = 'u'")["id"]
    db.run("INSERT INTO datasets(id, owner_id, name, kind, folder, created) "
           "VALUES ('ds1', ?, 'photos', 'folder', ?, ?)", (uid, str(folder.resolve()), time.time()))
    # the request as the API stores it: options the service could not ask for before
    # (small batches: more events from the embedding child)
    params = build_request_model()(map_method="pca", features="cnn", batch_size=2).model_dump()
    queue = JobQueue(db, tmp_path / "data", concurrency=1, poll=0.05)
    queue.start()
    try:
        job = queue.submit("ds1", uid, params)
        seen = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 900:
            j = db.job(job)
            seen.append((j["state"], j["progress"], j["stage"] or ""))
            if j["state"] in ("done", "failed"):
                break
            time.sleep(0.02)
    finally:
        queue.stop()
    assert j["state"] == "done", (j["error"], (tmp_path / "data" / "logs" / f"{job}.log")
                                  .read_text()[-3000:])
    assert j["progress"] == 1.0
    running = [p for s, p, _ in seen if s == "running"]
    assert running == sorted(running), "progress never goes back"
    embed = [p for s, p, stage in seen if s == "running" and stage.startswith("embed")]
    rises = sum(b > a for a, b in zip(embed, embed[1:]))
    # broken (no events from the child) it stays put: 0 rises. The child reports a chunk
    # (4 batches) at a time, its two threads finish chunks in pairs, and the worker writes at
    # most one figure per 0.1 s: batches of 2 (25 chunks) leave room for the 5 rises
    # on a busy machine too (batches of 8, 7 chunks, gave 4 rises once in CI).
    assert rises >= 5, (f"progress rose {rises} times in {len(embed)} polls while embedding "
                        f"(values {sorted(set(embed))})")
    assert any("/" in stage for s, _, stage in seen if stage.startswith("embed")), \
        "the stage text counts images"
    run = json.loads((dataset_dir(tmp_path / "data", "ds1") / "app.run.json").read_text())
    assert run["parameters"]["map_method"] == "pca" and run["parameters"]["seed"] is None
    assert run["counts"]["rows"] == N_IMAGES


def test_job_progress_from_events_never_goes_back_and_counts_in_the_stage_text():
    """The worker's reading of the events: stage weights, the count inside a stage, the
    figure never goes back (a stage the weights do not know counts as small)."""
    from explorer.progress import Event
    from explorer.service import worker

    got = []
    prog = worker.JobProgress(lambda f, s: got.append((f, s)))
    prog(Event("discover", 0, None))
    prog(Event("discover", 1, 1, seconds=0.1))
    for i in range(1, 5):
        prog._written = 0.0  # no throttling in the test
        prog(Event("embed", i, 4, "Embedding"))
    prog(Event("embed", 1, 1, seconds=3.0))
    prog(Event("unknown_stage", 0, None))
    prog(Event("unknown_stage", 1, 1, seconds=1.0))
    fractions = [f for f, _ in got]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert "embed: Embedding 4/4" in [s for _, s in got] and got[-1][1] == "unknown_stage"
    embed = [f for f, s in got if s.startswith("embed: ")]
    assert len(set(embed)) == 4  # each count moved the figure


def test_clustering_and_map_spinners_send_the_same_events():
    """``cluster``'s auto search and the map's spinner report through explorer.progress
    (they drew their own rich displays, which no build listener could see)."""
    import numpy as np

    from explorer import progress
    from explorer.stages.cluster import cluster

    Z = np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32)
    Z[:30] += 6
    got = []
    with progress.reporting(got.append), progress.stage("cluster"):
        cluster(Z, "auto", random_state=0, progress=True)
        with progress.spinner(True, "UMAP map (60 points)"):
            pass
    auto = [e for e in got if e.what == "auto: trying clusterings"]
    assert auto and auto[-1].done == auto[-1].total > 1
    assert all(e.stage == "cluster" for e in got)
    assert any(e.what == "UMAP map (60 points)" and e.total is None for e in got)
    assert got[-1].finished
