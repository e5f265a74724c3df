"""Benchmark ``explorer serve``: 20 concurrent clients while a build runs.

Starts a real service on a free port with generated images, builds one small dataset
(``--method phash``) so there is a CSV to read, then queues a default (network) build of a
bigger folder and, while that job is running, lets CLIENTS clients loop over three requests:
list datasets, download the CSV, poll the job. Prints the latency median and p95 per request
kind, requests per second, the service's RSS (and the build worker's), and the load average.

    PYTHONPATH=$PWD python bench/service.py [--clients 20] [--seconds 20] [--images 400]

``--attack``: instead, the front door under abuse (loopback only, bounded in connections,
bytes and time). One normal client calls ``/api/me`` and ``/api/datasets`` while
``--big-senders`` unauthenticated clients POST 200 MiB bodies again and again and
``--slow`` connections drip one header byte a second (each reopened when the service closes
it). Prints the normal client's latency before and during, the service's RSS before and at
its peak, how much of the big bodies the service took, how many slow connections it closed,
and how much its log grew. ``--nofile`` starts the service under that soft descriptor limit.

    PYTHONPATH=$PWD python bench/service.py --attack [--slow 500] [--seconds 20]
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
from _service import Server, add_user, wait_job  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _latencies(url: str, token: str, until: float) -> list[float]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as h:
        i = 0
        while time.monotonic() < until:
            t0 = time.perf_counter()
            r = h.get("/api/me" if i % 2 else "/api/datasets")
            i += 1
            out.append(time.perf_counter() - t0 if r.status_code == 200 else float("inf"))
            time.sleep(0.05)
    return out


def _summary(xs: list[float]) -> str:
    bad = sum(x == float("inf") for x in xs)
    ok = [x for x in xs if x != float("inf")] or [float("nan")]
    return (f"n={len(xs):4d}  median {statistics.median(ok) * 1000:7.1f} ms  p95 "
            f"{pct(ok, 0.95) * 1000:7.1f} ms  max {max(ok) * 1000:7.1f} ms  failed {bad}")


def attack(a) -> int:
    import socket

    MiB = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        base = Path(tmp)
        image_folder(base / "root" / "photos", 4, size=32)
        token = add_user(base / "data", "bench")
        server = Server(base / "root", base / "data", "--header-timeout",
                        str(a.header_timeout), nofile=a.nofile).start()
        port = int(server.url.rsplit(":", 1)[1])
        stop = threading.Event()
        stats = {"big_sent": 0, "big_posts": 0, "big_answers": {}, "slow_closed": 0,
                 "slow_open_peak": 0}
        lock = threading.Lock()
        try:
            rss0 = rss_mb(server.proc.pid)
            log0 = server.log.stat().st_size
            before = _latencies(server.url, token, time.monotonic() + a.baseline)

            def big_sender():
                head = (b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n" % (200 * MiB))
                chunk = b"A" * MiB
                while not stop.is_set():
                    sent, answer = 0, b""
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                            s.sendall(head)
                            s.settimeout(1.0)
                            try:  # the answer comes on the head alone ...
                                answer = s.recv(64)
                            except socket.timeout:
                                pass
                            s.settimeout(5.0)
                            while sent < 200 * MiB and not stop.is_set():
                                s.sendall(chunk)  # ... and the body is sent regardless
                                sent += MiB
                    except OSError:
                        pass
                    code = answer[9:12].decode("latin-1", "replace") or "no answer"
                    with lock:
                        stats["big_sent"] += sent
                        stats["big_posts"] += 1
                        stats["big_answers"][code] = stats["big_answers"].get(code, 0) + 1

            def slowloris():
                socks: list = []
                while not stop.is_set():
                    while len(socks) < a.slow and not stop.is_set():
                        try:
                            s = socket.create_connection(("127.0.0.1", port), timeout=5)
                            s.sendall(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-a: ")
                            s.setblocking(False)
                            socks.append(s)
                        except OSError:
                            break
                    with lock:
                        stats["slow_open_peak"] = max(stats["slow_open_peak"], len(socks))
                    alive = []
                    for s in socks:
                        try:
                            if s.recv(1) == b"":  # closed by the service
                                raise ConnectionResetError
                        except BlockingIOError:
                            pass
                        except OSError:
                            s.close()
                            with lock:
                                stats["slow_closed"] += 1
                            continue
                        try:
                            s.send(b"a")
                            alive.append(s)
                        except OSError:
                            s.close()
                            with lock:
                                stats["slow_closed"] += 1
                    socks = alive
                    stop.wait(1.0)
                for s in socks:
                    s.close()

            threads = [threading.Thread(target=big_sender) for _ in range(a.big_senders)]
            threads.append(threading.Thread(target=slowloris))
            for t in threads:
                t.start()
            rss_peak = [rss0]

            def watch():
                while not stop.is_set():
                    rss_peak[0] = max(rss_peak[0], rss_mb(server.proc.pid))
                    stop.wait(0.2)

            w = threading.Thread(target=watch)
            w.start()
            time.sleep(2.0)  # let the slow connections pile up
            during = _latencies(server.url, token, time.monotonic() + a.seconds)
            stop.set()
            for t in threads + [w]:
                t.join(30)
            log_growth = server.log.stat().st_size - log0
        finally:
            stop.set()
            server.stop()
    print(f"explorer serve under abuse for {a.seconds:.0f} s (loopback): {a.big_senders} "
          f"unauthenticated clients POSTing 200 MiB bodies, {a.slow} slow connections "
          f"(header timeout {a.header_timeout:g} s"
          + (f", service started under ulimit -n {a.nofile}" if a.nofile else "") + ")")
    print(f"  normal requests before: {_summary(before)}")
    print(f"  normal requests during: {_summary(during)}")
    print(f"  big POSTs: {stats['big_posts']}, answers {stats['big_answers']}, "
          f"{stats['big_sent'] / MiB:.0f} MiB handed to the kernel before the service's "
          "close broke the connections")
    print(f"  slow connections: peak {stats['slow_open_peak']} open, {stats['slow_closed']} "
          f"closed by the service")
    print(f"  service RSS {rss0:.0f} MiB before, peak {rss_peak[0]:.0f} MiB "
          f"(+{rss_peak[0] - rss0:.0f} MiB); log grew {log_growth / 1024:.1f} KiB")
    print(f"load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--images", type=int, default=400, help="images in the folder being built")
    ap.add_argument("--csv-images", type=int, default=200, help="rows of the CSV clients read")
    ap.add_argument("--attack", action="store_true", help="the abuse scenario (see above)")
    ap.add_argument("--slow", type=int, default=500, help="--attack: slow connections")
    ap.add_argument("--big-senders", type=int, default=2,
                    help="--attack: clients sending 200 MiB bodies without a token")
    ap.add_argument("--baseline", type=float, default=5.0,
                    help="--attack: seconds of normal requests before the attack")
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--nofile", type=int, default=None,
                    help="--attack: the service's soft descriptor limit (e.g. 256)")
    a = ap.parse_args()
    if a.attack:
        if not 0 < a.slow <= 2000 or not 0 <= a.big_senders <= 8 or not 0 < a.seconds <= 120:
            raise SystemExit("--attack stays bounded: --slow 1-2000, --big-senders 0-8, "
                             "--seconds up to 120")
        return attack(a)

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        base = Path(tmp)
        image_folder(base / "root" / "small", a.csv_images, size=64)
        image_folder(base / "root" / "big", a.images, size=96)
        token = add_user(base / "data", "bench")
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
