"""Memory of the service's ``/elbow`` input at many rows: the whole matrix converted (before)
against the memory-mapped sample (``routes.results.sample_features``, review N15).

Writes an N x D float16 ``.npy`` (what a build writes) to a temporary folder, then in a
fresh process each: reads the 20,000-row float32 sample the old way (``np.load(f)
.astype(np.float32)`` then sample) and the new way; prints each process's peak RSS and time.

    python bench/elbow.py --rows 1000000 --dim 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
import numpy as np
from explorer.service.routes.results import sample_features

def hwm():  # peak RSS of this process in KiB (VmHWM: unlike ru_maxrss, not inherited over exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

path, how = sys.argv[1], sys.argv[2]
base = hwm()  # after the imports
t0 = time.perf_counter()
if how == "before":
    X = np.load(path).astype(np.float32)
    if len(X) > 20_000:
        X = X[np.random.default_rng(0).choice(len(X), 20_000, replace=False)]
else:
    X = sample_features(path)
dt = time.perf_counter() - t0
peak = hwm()
print(f"{X.shape[0]} {dt:.2f} {base / 1024:.0f} {peak / 1024:.0f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-elbow-") as tmp:
        path = Path(tmp) / "app.features.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                        shape=(a.rows, a.dim))
        rng = np.random.default_rng(0)
        for i in range(0, a.rows, 100_000):
            out[i:i + 100_000] = rng.normal(size=(min(100_000, a.rows - i), a.dim))
        out.flush()
        del out
        size = path.stat().st_size / 2**20
        print(f"features: {a.rows:,} x {a.dim} float16, {size:,.0f} MiB on disk")
        for how in ("before", "after"):
            env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                   "PATH": "/usr/bin:/bin"}
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), how], env=env,
                               capture_output=True, text=True, check=True)
            rows, dt, base, peak = r.stdout.split()
            print(f"{how:>6}: {rows} rows sampled in {float(dt):.2f} s; peak RSS {peak} MiB "
                  f"(after imports {base} MiB)")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}  "
          f"({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
