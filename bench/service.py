"""Benchmark ``explorer serve``: 20 concurrent clients while a build runs.

Starts a real service on a free port with generated images, builds one small dataset
(``--method phash``) so there is a CSV to read, then queues a default (network) build of a
bigger folder and, while that job is running, lets CLIENTS clients loop over three requests:
list datasets, download the CSV, poll the job. Prints the latency median and p95 per request
kind, requests per second, the service's RSS (and the build worker's), and the load average.

    PYTHONPATH=$PWD python bench/service.py [--clients 20] [--seconds 20] [--images 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _imagegen import image_folder  # noqa: E402
from _service import Server, add_user, grant, wait_job  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--images", type=int, default=400, help="images in the folder being built")
    ap.add_argument("--csv-images", type=int, default=200, help="rows of the CSV clients read")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        base = Path(tmp)
        image_folder(base / "root" / "small", a.csv_images, size=64)
        image_folder(base / "root" / "big", a.images, size=96)
        token = add_user(base / "data", "bench")
        grant(base / "data", ".", user="bench")  # the access model: all of --root
        server = Server(base / "root", base / "data").start()
        try:
            c = server.client(token)
            small = c.post("/api/datasets", json={"name": "small", "folder": "small"}).json()["id"]
            j = wait_job(c, c.post(f"/api/datasets/{small}/builds",
                                   json={"method": "phash"}).json()["job"], timeout=900)
            assert j["state"] == "done", j
            big = c.post("/api/datasets", json={"name": "big", "folder": "big"}).json()["id"]
            job = c.post(f"/api/datasets/{big}/builds", json={}).json()["job"]
            while c.get(f"/api/jobs/{job}").json()["state"] == "queued":
                time.sleep(0.2)
            lat: dict[str, list[float]] = {"list": [], "csv": [], "job": []}
            errors: list[str] = []
            lock = threading.Lock()
            stop = time.monotonic() + a.seconds
            states = set()

            def client():
                with server.client(token, timeout=60) as h:
                    reqs = [("list", "/api/datasets"), ("csv", f"/api/datasets/{small}/table.csv"),
                            ("job", f"/api/jobs/{job}")]
                    i = 0
                    while time.monotonic() < stop:
                        kind, path = reqs[i % 3]
                        i += 1
                        t0 = time.perf_counter()
                        try:
                            r = h.get(path)
                            ok = r.status_code == 200
                        except httpx.HTTPError as exc:
                            ok, r = False, exc
                        dt = time.perf_counter() - t0
                        with lock:
                            if ok:
                                lat[kind].append(dt)
                                if kind == "job":
                                    states.add(r.json()["state"])
                            else:
                                errors.append(f"{kind}: {r}")

            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            rss_peak, worker_peak = 0.0, 0.0
            while any(t.is_alive() for t in threads):
                rss_peak = max(rss_peak, rss_mb(server.proc.pid))
                import psutil

                for ch in psutil.Process(server.proc.pid).children():
                    try:
                        worker_peak = max(worker_peak, ch.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                time.sleep(0.5)
            wall = time.monotonic() - t0
            final = c.get(f"/api/jobs/{job}").json()
        finally:
            server.stop()

    n = sum(len(v) for v in lat.values())
    print(f"explorer serve, {a.clients} clients for {wall:.1f} s while a default build of "
          f"{a.images} images ran (job states seen by the clients: {sorted(states)}; "
          f"job at the end: {final['state']}, progress {final['progress']})")
    print(f"CSV read: {a.csv_images} rows")
    for kind, xs in lat.items():
        if xs:
            print(f"  {kind:5s} n={len(xs):5d}  median {statistics.median(xs) * 1000:7.1f} ms  "
                  f"p95 {pct(xs, 0.95) * 1000:7.1f} ms")
    allx = [x for v in lat.values() for x in v]
    print(f"  all   n={n:5d}  median {statistics.median(allx) * 1000:7.1f} ms  "
          f"p95 {pct(allx, 0.95) * 1000:7.1f} ms  ({n / wall:.0f} requests/s)")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"service RSS peak {rss_peak:.0f} MiB; build worker RSS peak {worker_peak:.0f} MiB")
    print(f"load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
