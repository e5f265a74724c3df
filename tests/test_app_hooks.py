"""app_files/app_hooks.py: the once-per-server warm-up of the re-cluster code."""

import importlib.util
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("app_hooks", ROOT / "app_files" / "app_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_warm_up_starts_in_background_unless_switched_off(monkeypatch):
    started = []

    class FakeThread:
        def __init__(self, target, name, daemon):
            started.append((target.__name__, name, daemon))

        def start(self):
            started.append("start")

    hooks = _hooks()
    monkeypatch.setattr(threading, "Thread", FakeThread)
    monkeypatch.setenv("EXPLORER_NO_WARMUP", "1")
    hooks.on_server_loaded(None)
    assert started == []
    monkeypatch.delenv("EXPLORER_NO_WARMUP")
    hooks.on_server_loaded(None)
    assert started == [("_warm_up", "explorer-warm-up", True), "start"]


def test_demo_has_the_same_hooks_as_the_template():
    assert (ROOT / "demo" / "app_hooks.py").read_text() == (ROOT / "app_files" / "app_hooks.py").read_text()
