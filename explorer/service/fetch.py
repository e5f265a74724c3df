"""Download images from URLs into a dataset, one report line per URL.

Rules (each redirect hop is checked again):

* ``http`` and ``https`` only, with a host name; no user:password in the URL;
* the host is resolved once and the connection goes to that address (no DNS rebinding in
  between); loopback, private, link-local, multicast, reserved and unspecified addresses
  are refused unless the service runs with ``--allow-private-urls``, also when they are
  embedded in an IPv6 address (IPv4-mapped, 6to4, NAT64, Teredo);
* at most ``max_redirects`` redirects; a connect/read timeout and a deadline per URL;
* the answer must say ``Content-Type: image/...``, be at most ``max_bytes`` long (checked
  while streaming, whatever Content-Length says) and open as an image.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

from explorer.service.uploads import Intake


@dataclass(frozen=True)
class FetchRules:
    allow_private: bool = False
    max_bytes: int = 50 * 2**20
    timeout: float = 10.0
    deadline: float = 60.0
    max_redirects: int = 5
    max_urls: int = 500
    parallel: int = 4


class URLRefused(ValueError):
    """A URL (or a redirect target) that the rules refuse."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress._BaseAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and may be routed to: IPv4-mapped
    (``::ffff:a.b.c.d``), 6to4 (``2002::/16``), NAT64 (``64:ff9b::/96``) and Teredo
    (``2001::/32``: its server and its client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def _blocked(ip: ipaddress._BaseAddress) -> str | None:
    for inner in embedded_ipv4(ip):
        why = _blocked(inner)
        if why:
            return f"{why}, embedded {inner}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{what}"):
            return what.replace("_", "-")
    if not ip.is_global:
        return "not global"
    return None


async def check_url(url: str, rules: FetchRules) -> tuple[str, str, str, int]:
    """(scheme, host, address to connect to, port) for ``url``; raises URLRefused."""
    if not isinstance(url, str) or len(url) > 4096:
        raise URLRefused("not a URL (text up to 4096 characters)")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise URLRefused(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLRefused(f"scheme {parts.scheme or '(none)'!r} refused; only http and https")
    if not parts.hostname:
        raise URLRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise URLRefused("URLs with a user name or password are refused")
    host = parts.hostname
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise URLRefused(f"cannot resolve host {host!r} ({exc})") from None
    addrs = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
    if not addrs:
        raise URLRefused(f"host {host!r} has no address")
    if not rules.allow_private:
        for a in addrs:
            why = _blocked(a)
            if why:
                raise URLRefused(f"host {host!r} resolves to {a} ({why} address); refused "
                                 "(the service allows only public addresses)")
    return scheme, host, str(addrs[0]), port


def _name_for(url: str, i: int) -> str:
    path = unquote(urlsplit(url).path)
    name = PurePosixPath(path).name or f"download-{i}"
    return name


async def _fetch_one(client, url: str, i: int, rules: FetchRules, staging: Path) -> tuple[Path, str]:
    """Download ``url`` (following checked redirects) to a staged file; return (file, name)."""
    t0 = time.monotonic()
    current = url
    for hop in range(rules.max_redirects + 1):
        scheme, host, addr, port = await check_url(current, rules)
        parts = urlsplit(current)
        netloc = f"[{addr}]" if ":" in addr else addr
        target = parts._replace(scheme=scheme, netloc=f"{netloc}:{port}").geturl()
        default_port = port == (443 if scheme == "https" else 80)
        headers = {"Host": host if default_port else f"{host}:{port}",
                   "Accept": "image/*", "User-Agent": "bulk-image-explorer"}
        ext = {"sni_hostname": host} if scheme == "https" else {}
        async with client.stream("GET", target, headers=headers, extensions=ext) as resp:
            if resp.status_code in (301, 302, 303, 307, 308):
                loc = resp.headers.get("location")
                if not loc:
                    raise URLRefused(f"redirect ({resp.status_code}) without a Location")
                current = urljoin(current, loc)
                continue
            if resp.status_code != 200:
                raise URLRefused(f"the server answered {resp.status_code}")
            ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise URLRefused(f"content type {ctype or '(none)'!r} is not an image type")
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > rules.max_bytes:
                raise URLRefused(f"{int(length):,} bytes is more than the limit of "
                                 f"{rules.max_bytes:,}")
            staged = staging / f"url-{i}"
            n = 0
            with open(staged, "wb") as out:
                async for chunk in resp.aiter_bytes():
                    n += len(chunk)
                    if n > rules.max_bytes:
                        raise URLRefused(f"more than the limit of {rules.max_bytes:,} bytes")
                    if time.monotonic() - t0 > rules.deadline:
                        raise URLRefused(f"took longer than {rules.deadline:.0f} s")
                    out.write(chunk)
            return staged, _name_for(current, i)
    raise URLRefused(f"more than {rules.max_redirects} redirects")


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
                    staged, name = await asyncio.wait_for(
                        _fetch_one(client, url, i, rules, staging), rules.deadline + 5)
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
