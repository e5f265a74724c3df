"""Fixtures shared by the whole test run (add yours below; keep each one cheap to skip)."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # with pytest-xdist each worker is one of the processes sharing the cores: one OpenMP /
    # BLAS / torch thread each, for the worker and the servers and builds it starts (two
    # workers of two threads on 2 cores spun on each other: embed + features + search
    # files 161 -> 137 CPU s, 162 -> 102 s; docs/testing.md). Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

#: ``EXPLORER_TEST_CPU=N`` / ``--cpu-top N``: the N tests that cost the most CPU seconds;
#: tests marked ``cpu_check`` run under both answers of the CPU check (tests/_cpucheck.py)
pytest_plugins = ["tests._cputime", "tests._cpucheck"]

#: the files that take the longest (measured 2026-12-07, docs/testing.md), longest first,
#: alternating one that mostly waits (browsers, servers, a local Ray: CPU less than 60% of its
#: wall time) with one that mostly computes (real builds, emulated bf16, the notebook), so
#: that the two workers' waits fall beside the other's work. They are handed out first, in
#: this order (``make test`` passes ``--no-loadscope-reorder``: by default pytest-xdist hands
#: out the files with the most tests first, whatever the order here); the files handed out
#: last are short, so neither worker idles long while the other finishes a long file.
HEAVY_FILES = (
    "test_ray.py", "test_service.py", "test_app_browser.py", "test_search.py",
    "test_app_curation_browser.py", "test_pipeline.py", "test_service_limits.py",
    "test_app_document.py", "test_app_treemap.py", "test_notebook.py",
    "test_app_layout_browser.py", "test_embed.py", "test_app_labelling_browser.py",
    "test_app_hooks.py", "test_browser_duplicates.py", "test_service_policy.py",
    "test_app_labelling_map_browser.py", "test_service_queue.py", "test_build_progress.py",
    "test_app_finder_browser.py", "test_service_schema.py", "test_sources.py",
)


def pytest_collection_modifyitems(session, config, items):
    """The files of :data:`HEAVY_FILES` first (in that order), then the rest as collected;
    the tests of a file keep their order."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def run_cache(tmp_path_factory):
    """The run's ``XDG_CACHE_HOME`` (tests/_sharedcache.py), for every test and the servers,
    builds and kernels they start: the tool's user cache (the exported ONNX model, the
    class-name vectors) is made once per run, never in the user's home, and a test that
    needs an empty one sets its own."""
    from _sharedcache import shared_cache_dir

    path = shared_cache_dir(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


#: timm's own test model: 160 px input, 256-d features, a 1000-class head; with fixed random
#: weights it embeds in milliseconds and needs no download
TINY_MODEL = "test_efficientnet"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A state dict of timm's tiny test model (random but fixed weights), made once."""
    import timm
    import torch

    torch.manual_seed(0)
    m = timm.create_model(TINY_MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("tiny-ckpt") / "tiny.pth"
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def quick_build(tiny_ckpt) -> dict:
    """``build()`` options for tests about the CSV, not the weights or the embedding
    process: the tiny model, embedded in this process (no child start, no torch import per
    build)."""
    return {"model": TINY_MODEL, "checkpoint": str(tiny_ckpt), "embed_process": False}
