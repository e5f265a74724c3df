"""Many sessions on one server: memory per session and event-loop lag during a big zip.

Starts ``bokeh serve`` on a generated project (``--points`` rows, each with its own small
JPEG original), then

  * opens ``--sessions`` sessions with ``bokeh.client.pull_session`` and prints the server's
    resident memory before, after, and per added session (goal: < 10 MB each at 100k rows);
  * in one session selects every image and presses Save with images (a zip of all the
    originals, written in the server's worker pool), and meanwhile, from another session,
    makes selections and times each until the server's answer (the table) comes back
    (goal: < 0.5 s while the zip is written).

Prints medians and the load average; asserts nothing.

    .venv/bin/python bench/sessions.py [--points 100000] [--sessions 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _browser as B  # noqa: E402
from _appdata import make_big_csv  # noqa: E402


def originals(root: Path, n: int) -> Path:
    """``n`` small JPEGs under root/images/img/NNNNNNN.jpg (the paths make_big_csv writes)."""
    import io
    import json

    import numpy as np
    from PIL import Image

    folder = root / "images" / "img"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
        blobs.append(buf.getvalue())
    for i in range(n):
        (folder / f"{i:07d}.jpg").write_bytes(blobs[i % 16])
    (root / "big.run.json").write_text(json.dumps({"image_dir_from_csv": "images"}))
    return folder


def rss(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def wait(session, predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    session._connection._loop_until(lambda: predicate() or time.monotonic() > deadline)
    return predicate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--probes", type=int, default=15, help="selections timed during the zip")
    args = ap.parse_args(argv)

    from bokeh.client import pull_session
    from bokeh.events import ButtonClick

    with tempfile.TemporaryDirectory(prefix="explorer-sessions-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        app_dir, csv = make_big_csv(root, args.points)
        originals(root, args.points)
        print(f"generated {args.points:,} rows and JPEG originals in {time.perf_counter() - t:.0f} s")
        proc, url = B.launch(app_dir, csv, timeout=300)
        try:
            first = pull_session(url=url)  # the project is loaded by the first session
            base = rss(proc.pid)
            sessions = []
            t = time.perf_counter()
            for _ in range(args.sessions):
                sessions.append(pull_session(url=url))
            opened = time.perf_counter() - t
            time.sleep(2)
            after = rss(proc.pid)
            per = (after - base) / max(1, args.sessions)
            print(f"memory: server {base:,.0f} MB with 1 session, {after:,.0f} MB with {args.sessions + 1} "
                  f"sessions: {per:.1f} MB per added session (goal < 10 MB); opening them took {opened:.1f} s")

            # one session zips every original
            zipper = sessions[0]
            doc = zipper.document
            pts = doc.select_one({"name": "points"})
            status = doc.select_one({"name": "status"})
            dl = doc.select_one({"name": "downloads"})
            pts.selected.indices = list(range(args.points))
            wait(zipper, lambda: "selected" in status.text, 60)
            doc.select_one({"name": "save_name"}).value = "everything"
            doc.select_one({"name": "save_images"}).active = True
            t_zip = time.perf_counter()
            doc.callbacks.send_event(ButtonClick(doc.select_one({"name": "save"})))
            wait(zipper, lambda: "working" in status.text, 30)

            # another session keeps selecting meanwhile
            probe = sessions[1]
            pdoc = probe.document
            ppts = pdoc.select_one({"name": "points"})
            table = pdoc.select_one({"name": "table_info"})
            lags = []
            n = len(ppts.data["x"])
            for k in range(args.probes):
                size = min(min(1000, n // 4) + 37 * k, n)  # each probe a new count, within the map
                start = (k * 4099) % max(1, n - size)
                ppts.selected.indices = list(range(start, start + size))
                t = time.perf_counter()
                ok = wait(probe, lambda s=size: f"{s:,} selected row(s)" in table.text or f"of {s:,}" in table.text, 30)
                lags.append(time.perf_counter() - t if ok else float("nan"))
                if dl.data["url"]:
                    break
            zipping = wait(zipper, lambda: bool(dl.data["url"]), 3600)
            zip_s = time.perf_counter() - t_zip
            print(f"zip: {args.points:,} originals saved in {zip_s:.1f} s" + ("" if zipping else " (did not finish)"))
            print(f"lag: another session's selection -> its table, while the zip was written: median "
                  f"{statistics.median(lags):.3f} s, max {max(lags):.3f} s over {len(lags)} selections (goal < 0.5 s)")
            print(f"status: {status.text[-200:]}")
            for s in sessions + [first]:
                s.close()
        finally:
            B.stop(proc)
    print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
