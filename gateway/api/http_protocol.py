"""uvicorn's HTTP/1.1 protocol (httptools), with bounds on a request's head and on
how slowly a request may arrive.

httptools puts no limit on the request line and headers: it gathers a header's
value for as long as the client sends it, in memory, before the gateway sees the
request. Three clients sending 150 MB headers held 1.1 GB of a worker without a
token. This protocol counts what a request's head has taken and, beyond
:data:`MAX_HEAD_BYTES`, answers ``431 Request Header Fields Too Large`` (RFC 6585)
and closes the connection, as nginx and Node.js bound theirs.

uvicorn times only an idle connection after a response: one that has sent part
of a request, or nothing yet, is kept for as long as the client likes (a client
adding a header every few seconds held its connection and 120 KiB of memory for
good). A request's head must arrive within ``request_head_timeout_s`` and its
body may pause no longer than ``request_body_timeout_s`` (nginx's
``client_header_timeout`` and ``client_body_timeout``); then the connection is
closed, with ``408 Request Timeout`` when no answer was begun.

uvicorn's ``Date`` is made once a second, and is up to a second behind the
moment a response leaves: a write's ``Last-Modified`` came out later than its
``Date``, which RFC 9110 8.8.2.1 forbids ("MUST NOT send a Last-Modified date
that is later than the server's time of message origination"). The ``Date``
here is the response's own second.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from functools import lru_cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings

#: the most a request line and its headers may take: a browser's cookies and a
#: token sit well inside it
MAX_HEAD_BYTES = 128 * 1024

_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\n"
            b"connection: close\r\n\r\nrequest header fields too large")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\n"
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\n"
            b"connection: close\r\n\r\nthe request took too long to send")


_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """``Date`` for a response leaving now (RFC 9110 5.6.7), made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date[1]


class _DatedWhenSent(list[tuple[bytes, bytes]]):
    """uvicorn's default headers, whose ``Date`` is taken when the response starts
    (uvicorn adds them to the response's own: ``default_headers + headers``)."""

    def __add__(self, other: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        return [(name, _http_date() if name == b"date" else value)
                for name, value in list.__iter__(self)] + other


@lru_cache(maxsize=1)
def _timeouts() -> tuple[float, float]:
    """(head, body) in seconds, from the worker's settings."""
    settings = Settings.from_env()
    return settings.request_head_timeout_s, settings.request_body_timeout_s


class BoundedHeadProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that refuses a request head beyond
    :data:`MAX_HEAD_BYTES` and closes a connection whose request arrives too slowly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # what the reads of an unfinished head brought
        self._head_size = 0  # the request line's and headers' bytes, as parsed
        self._in_head = True
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    # -- timing ---------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_TIMEOUT)
        # (a body that stopped coming: the request's task sees the disconnect)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_timeouts()[0])  # the first request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- parsing --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_size = 0
        self._arm(_timeouts()[0])

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        if self._head_size > MAX_HEAD_BYTES:
            # a head that ended in the read that took it past the bound
            self._refuse()
            return
        self._arm(_timeouts()[1])
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.default_headers = _DatedWhenSent(self.cycle.default_headers)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._arm(_timeouts()[1])
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if self._refused:
            return
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # (counted after parsing: bytes past the end of the head are its body)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()

    def handle_websocket_upgrade(self) -> None:
        # the connection is the WebSocket protocol's from now on: no request of
        # this protocol is arriving on it any more
        self._disarm()
        super().handle_websocket_upgrade()

    def _refuse(self) -> None:
        self._refused = True
        self._disarm()
        self.transport.write(_REFUSAL)
        self.transport.close()
