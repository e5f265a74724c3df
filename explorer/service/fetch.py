"""Download images from URLs into a dataset, one report line per URL.

The rules (schemes, addresses, redirects, size and type caps) live in :mod:`explorer.inputs.urlfetch`,
shared with ``explorer build urls.txt``; here each downloaded file then goes through the
upload checks (:class:`explorer.service.uploads.Intake`: it must open as an image).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from explorer.service.uploads import Intake
from explorer.inputs.urlfetch import FetchRules, URLRefused, blocked, check_url, fetch_one

__all__ = ["FetchRules", "URLRefused", "blocked", "check_url", "download"]


async def download(urls: list[str], images: Path, staging: Path, rules: FetchRules,
                   intake: Intake) -> list[dict]:
    """Download every URL into ``images`` through ``intake``; one report dict per URL, in
    order: ``{"url", "ok", "file"}`` or ``{"url", "ok": false, "error"}``."""
    import anyio
    import httpx

    if len(urls) > rules.max_urls:
        raise ValueError(f"{len(urls)} URLs is more than the limit of {rules.max_urls} per request")
    staging.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(rules.parallel)
    lock = threading.Lock()

    def add(staged: Path, name: str) -> dict:
        with lock:
            before = len(intake.report)
            intake.add_file(staged, name)
            return intake.report[before]

    out: list[dict] = [{} for _ in urls]
    timeout = httpx.Timeout(rules.timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:

        async def one(i: int, url: str):
            async with sem:
                try:
                    staged, name, _ = await asyncio.wait_for(
                        fetch_one(client, url, i, rules, staging), rules.deadline + 5)
                except URLRefused as exc:
                    out[i] = {"url": url, "ok": False, "error": str(exc)}
                    return
                except asyncio.TimeoutError:
                    out[i] = {"url": url, "ok": False,
                              "error": f"took longer than {rules.deadline:.0f} s"}
                    return
                except httpx.HTTPError as exc:
                    out[i] = {"url": url, "ok": False,
                              "error": f"download failed ({type(exc).__name__}: {exc})"}
                    return
                line = await anyio.to_thread.run_sync(add, staged, name)
                out[i] = ({"url": url, "ok": True, "file": line["file"]} if line["ok"]
                          else {"url": url, "ok": False, "error": line["error"]})

        await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
    for p in staging.glob("url-*"):
        p.unlink(missing_ok=True)
    return out
