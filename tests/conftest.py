"""Fixtures shared by the whole test run (add yours below; keep each one cheap to skip)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ``EXPLORER_TEST_CPU=N`` / ``--cpu-top N``: the N tests that cost the most CPU seconds;
#: tests marked ``cpu_check`` run under both answers of the CPU check (tests/_cpucheck.py)
pytest_plugins = ["tests._cputime", "tests._cpucheck"]

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
