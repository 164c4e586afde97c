"""uvicorn's HTTP/1.1 protocol (httptools), with a bound on a request's head.

httptools puts no limit on the request line and headers: it gathers a header's
value for as long as the client sends it, in memory, before the gateway sees the
request. Three clients sending 150 MB headers held 1.1 GB of a worker without a
token. This protocol counts what a request's head has taken and, beyond
:data:`MAX_HEAD_BYTES`, answers ``431 Request Header Fields Too Large`` (RFC 6585)
and closes the connection, as nginx and Node.js bound theirs.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: the most a request line and its headers may take: a browser's cookies and a
#: token sit well inside it
MAX_HEAD_BYTES = 128 * 1024

_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\n"
            b"connection: close\r\n\r\nrequest header fields too large")


class BoundedHeadProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that refuses a request head beyond :data:`MAX_HEAD_BYTES`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # (counted after parsing: bytes past the end of the head are its body)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.transport.write(_REFUSAL)
                self.transport.close()
