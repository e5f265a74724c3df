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


def test_demo_app_is_an_up_to_date_copy_of_the_template():
    """demo/ is what `explorer build --app demo` installs from app_files/: no stale copies."""
    template = ROOT / "app_files"
    files = [p for p in template.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "app_hooks.py" for p in files)
    for src in files:
        copy = ROOT / "demo" / src.relative_to(template)
        assert copy.is_file() and copy.read_bytes() == src.read_bytes(), f"demo is stale: {copy}"
