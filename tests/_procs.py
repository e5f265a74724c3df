"""Run a piece of Python in a fresh interpreter: another server process, nothing cached."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def in_new_process(code: str, *args) -> str:
    """Run ``code`` (dedented) with ``args`` as ``sys.argv[1:]`` in a fresh interpreter that
    imports this checkout's ``explorer``; return its stdout (fails the test on a non-zero exit)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout
