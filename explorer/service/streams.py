"""Stream what a blocking writer writes (e.g. a zip) to an HTTP response, in bounded memory.

``stream_from(write)`` runs ``write(fileobj)`` in a thread; ``fileobj`` is a write-only,
unseekable file whose chunks go through a small queue to the async generator that the
response iterates. At most ``depth`` chunks wait at a time, so a slow client slows the writer
instead of filling memory; when the client goes away the writer's next ``write`` raises
:class:`ClientGone` and the thread ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, AsyncIterator, Callable

_END = object()


class ClientGone(OSError):
    """The response was abandoned (the client disconnected); stop writing."""


class _QueueWriter:
    def __init__(self, q: queue.Queue, gone: threading.Event):
        self.q, self.gone = q, gone

    def write(self, data) -> int:
        data = bytes(data)
        while True:
            if self.gone.is_set():
                raise ClientGone("the client went away")
            try:
                self.q.put(data, timeout=0.5)
                return len(data)
            except queue.Full:
                continue

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


async def stream_from(write: Callable[[Any], Any], depth: int = 16) -> AsyncIterator[bytes]:
    """Yield the bytes ``write(fileobj)`` writes, while it writes them (see the module)."""
    import anyio

    q: queue.Queue = queue.Queue(maxsize=depth)
    gone = threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            write(_QueueWriter(q, gone))
        except BaseException as exc:  # noqa: BLE001 - reported to the reader below
            failure.append(exc)
        finally:
            while not gone.is_set():
                try:
                    q.put(_END, timeout=0.5)
                    break
                except queue.Full:
                    continue

    t = threading.Thread(target=run, name="explorer-stream", daemon=True)
    t.start()

    def get():
        while True:
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                if not t.is_alive() and q.empty():
                    return _END

    try:
        while True:
            chunk = await anyio.to_thread.run_sync(get)
            if chunk is _END:
                break
            yield chunk
        if failure and not isinstance(failure[0], ClientGone):
            # headers are sent: the truncated body is all a client can be told
            raise failure[0]
    finally:
        gone.set()
