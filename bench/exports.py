"""Export figures: plan (every source through paths.resolve_under with a PIL header check)
and the streamed zip, on a real folder of photos. Prints medians; asserts nothing.

    python bench/exports.py ../shared/data/clothing-small [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import pandas as pd

from explorer.curation.exports import plan_export, write_zip
from explorer.stages.images import discover


class Null(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        return len(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    root = Path(a.folder).resolve()
    paths = [p.relative_to(root).as_posix() for p in discover(root)]
    df = pd.DataFrame({"path": paths, "label": [p.split("/")[-2] for p in paths],
                       "cluster": [i % 20 for i in range(len(paths))]})
    plan_t, zip_t = [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        plan = plan_export(df, root, layout="label", imagefolder=True)
        plan_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rep = write_zip(plan.entries, Null())
        zip_t.append(time.perf_counter() - t0)
    tracemalloc.start()
    write_zip(plan.entries, Null())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n, mb = len(plan.entries), rep.bytes_in / 2**20
    print(f"{n:,} images, {mb:,.1f} MiB, refused {len(plan.refused)}")
    print(f"plan (resolve_under + header check): median {statistics.median(plan_t):.2f} s "
          f"({n / statistics.median(plan_t):,.0f} images/s)")
    print(f"write_zip to a null stream: median {statistics.median(zip_t):.2f} s "
          f"({mb / statistics.median(zip_t):,.0f} MiB/s), traced peak {peak / 2**20:.1f} MiB")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
