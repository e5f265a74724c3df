"""Downloading images from http(s) URLs under one set of rules (the service and the CLI).

Rules (each redirect hop is checked again):

* ``http`` and ``https`` only, with a host name; no user:password in the URL;
* the host is resolved once and the connection goes to that address (no DNS rebinding in
  between); loopback, private, link-local, multicast, reserved and unspecified addresses
  are refused unless allowed (``FetchRules.allow_private``: the service's and the build's
  ``--allow-private-urls``);
* at most ``max_redirects`` redirects; a connect/read timeout and a deadline per URL;
* the answer must say ``Content-Type: image/...`` and be at most ``max_bytes`` long (checked
  while streaming, whatever Content-Length says).

:func:`fetch_one` downloads one URL to a file; the service (:mod:`explorer.service.fetch`)
then takes the file in through its upload checks; ``explorer build urls.txt`` keeps it in a
cache folder (:func:`fetch_to_cache`), so a re-run downloads nothing again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

__all__ = ["FetchRules", "URLRefused", "check_url", "fetch_one", "read_url_list",
           "fetch_to_cache", "IMAGE_TYPES"]


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


def blocked(ip: ipaddress._BaseAddress) -> str | None:
    """Why ``ip`` may not be fetched without ``allow_private`` (e.g. "loopback"), or None;
    an IPv6 address that embeds a refused IPv4 one (mapped, 6to4, NAT64, Teredo) is refused."""
    for inner in embedded_ipv4(ip):
        why = blocked(inner)
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
            why = blocked(a)
            if why:
                raise URLRefused(f"host {host!r} resolves to {a} ({why} address); refused "
                                 "(only public addresses are allowed; see --allow-private-urls)")
    return scheme, host, str(addrs[0]), port


def _name_for(url: str, i: int) -> str:
    path = unquote(urlsplit(url).path)
    name = PurePosixPath(path).name or f"download-{i}"
    return name


async def fetch_one(client, url: str, i: int, rules: FetchRules,
                    staging: Path) -> tuple[Path, str, str]:
    """Download ``url`` (following checked redirects) to the file ``staging/url-<i>``;
    ``(file, name, content type)``, ``name`` being the last URL's file name. Raises
    :class:`URLRefused` (a rule), ``httpx.HTTPError`` (the transfer failed)."""
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
            return staged, _name_for(current, i), ctype
    raise URLRefused(f"more than {rules.max_redirects} redirects")




# --------------------------------------------------------------------------- URL lists
#: the image types a build reads, and the suffix a downloaded file of that type gets
IMAGE_TYPES = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/pjpeg": ".jpg",
               "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif",
               "image/bmp": ".bmp", "image/x-ms-bmp": ".bmp", "image/tiff": ".tif"}
#: a URL list may hold at most this many URLs
MAX_LIST_URLS = 1_000_000
#: the cache folder's index: URL -> file name
INDEX = "index.json"


def read_url_list(path: str | os.PathLike, max_urls: int = MAX_LIST_URLS
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """The URLs of a text file, one per line (blank lines and ``#`` comments skipped, each
    URL once), and ``(line, reason)`` for lines that are not http(s) URLs. ``ValueError``
    for an unreadable file or more than ``max_urls`` URLs."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the URL list {path}: {exc}") from None
    urls: list[str] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in text.splitlines():
        url = line.strip()
        if not url or url.startswith("#") or url in seen:
            continue
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            errors.append((url[:200], "not an http(s) URL"))
            continue
        seen.add(url)
        urls.append(url)
        if len(urls) > max_urls:
            raise ValueError(f"{path} lists more than {max_urls:,} URLs")
    return urls, errors


def _cache_name(url: str, name: str, suffix: str) -> str:
    """``<safe stem>-<hash of the URL>.<suffix>``: one file per URL, whatever it is called."""
    from explorer.stages.images import thumbnail_names

    stem = thumbnail_names([name or "image"])[0].rsplit("-", 1)[0]
    return f"{stem}-{hashlib.blake2b(url.encode('utf-8'), digest_size=8).hexdigest()}{suffix}"


def fetch_to_cache(urls: list[str], folder: str | os.PathLike, rules: FetchRules, *,
                   console: Any = None) -> tuple[list[Path], list[str], list[tuple[str, str]]]:
    """Download each URL not yet in ``folder`` (an index there remembers which file each URL
    became), under ``rules``. Returns ``(files, names, errors)``: a file and its name (the
    CSV path, relative to ``folder``) per URL that is there, in list order, and ``(url,
    reason)`` for each refused or failed one (tried again on the next run)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}

    def cached(url: str) -> str | None:
        name = index.get(url)
        ok = isinstance(name, str) and "/" not in name and not name.startswith(".") and \
            (folder / name).is_file()
        return name if ok else None

    todo = [u for u in urls if cached(u) is None]
    errors: dict[str, str] = {}
    if todo:
        if console is not None:
            console.print(f"Downloading {len(todo)} of {len(urls)} URLs into {folder}")
        got, errors = asyncio.run(_fetch_all(todo, folder, rules))
        index.update(got)
        from explorer.table import atomic_write_text

        atomic_write_text(index_path, json.dumps(index, indent=0, sort_keys=True))
    files, names, errs = [], [], []
    for u in urls:
        name = cached(u)
        if name is None:
            errs.append((u[:200], errors.get(u, "not downloaded")))
            continue
        files.append((folder / name).resolve())
        names.append(name)
    return files, names, errs


async def _fetch_all(urls: list[str], folder: Path, rules: FetchRules
                     ) -> tuple[dict[str, str], dict[str, str]]:
    import httpx

    sem = asyncio.Semaphore(rules.parallel)
    got: dict[str, str] = {}
    errors: dict[str, str] = {}
    staging = folder / ".partial"
    staging.mkdir(exist_ok=True)

    async def one(i: int, url: str, client) -> None:
        async with sem:
            try:
                staged, name, ctype = await asyncio.wait_for(
                    fetch_one(client, url, i, rules, staging), rules.deadline + 5)
            except URLRefused as exc:
                errors[url] = str(exc)
                return
            except asyncio.TimeoutError:
                errors[url] = f"took longer than {rules.deadline:.0f} s"
                return
            except httpx.HTTPError as exc:
                errors[url] = f"download failed ({type(exc).__name__}: {exc})"
                return
            suffix = IMAGE_TYPES.get(ctype)
            if suffix is None:
                staged.unlink(missing_ok=True)
                errors[url] = f"image type {ctype!r} is not one the build reads"
                return
            final = _cache_name(url, PurePosixPath(name).stem, suffix)
            os.replace(staged, folder / final)
            got[url] = final

    timeout = httpx.Timeout(rules.timeout)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                     trust_env=False) as client:
            await asyncio.gather(*(one(i, u, client) for i, u in enumerate(urls)))
    finally:
        for p in staging.glob("url-*"):
            p.unlink(missing_ok=True)
        try:
            staging.rmdir()
        except OSError:
            pass
    return got, errors
