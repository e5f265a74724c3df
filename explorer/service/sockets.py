"""What keeps strangers' connections from exhausting ``explorer serve`` before any request is
read (the server side of the front door; :mod:`explorer.service.guard` is the request side).

* :func:`header_timeout_protocol`: uvicorn's HTTP protocol with a deadline for a request's
  head: a connection that has not sent a complete request line and headers within
  ``seconds`` (from connecting, or from the first byte of its next request) is closed.
  uvicorn has no such limit, so a client dripping one header byte at a time holds a
  connection forever (slowloris).
* :func:`raise_fd_limit`: the soft ``RLIMIT_NOFILE`` raised towards the hard limit at start,
  so idle connections do not run the process out of descriptors at the common 1,024.
* :class:`RateLimitedLog`: a logging filter that lets one "out of descriptors"/accept error
  through every ``every`` seconds and counts the rest, so EMFILE cannot fill the disk.
"""

from __future__ import annotations

import errno
import logging
import time

FD_TARGET = 65536


def raise_fd_limit(target: int = FD_TARGET) -> int:
    """Raise the soft descriptor limit to ``min(target, hard)``; return the soft limit."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol class with a ``seconds`` deadline for each request head."""
    if not seconds > 0:
        raise ValueError(f"header timeout must be > 0 seconds, got {seconds!r}")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._head_deadline is None:  # a new request has begun: its head is due
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _expired(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


_FLOOD_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class RateLimitedLog(logging.Filter):
    """Let one accept/descriptor error record through every ``every`` seconds; the next one
    that passes says how many were dropped. Other records pass unchanged."""

    def __init__(self, every: float = 10.0):
        super().__init__()
        self.every = every
        self._last = float("-inf")
        self.dropped = 0

    @staticmethod
    def is_flood(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in _FLOOD_ERRNOS:
            return True
        msg = record.getMessage()
        return "accept" in msg.lower() or "Too many open files" in msg

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_flood(record):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            self.dropped += 1
            return False
        self._last = now
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} more like this in the last " \
                         f"{self.every:g} s not logged)"
            self.dropped = 0
        return True
