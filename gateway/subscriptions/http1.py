"""A small HTTP/1.1 client for notification POSTs: keep-alive, TLS, strict limits.

Why not a general client: a rest-hook delivery is one POST to an address the
endpoint policy has just checked, with no redirects, cookies, proxies or
authentication of our own. Connecting straight to that checked address keeps
DNS out of the way between check and connect, and the general clients we
measured spent 5-15x the CPU of this one per notification (their pools and
async-library detection dominate at thousands of notifications a second).

RFC 9112 (HTTP/1.1 message syntax): request line, ``Host``, ``Content-Length``;
responses with ``Content-Length`` or ``chunked`` bodies are read, a response
delimited by closing is not waited for (the connection is closed instead);
informational (1xx) responses are skipped. At most ``MAX_BODY`` bytes of a
response body are read; a connection is reused only after a complete,
well-framed response that does not ask to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

MAX_BODY = 64 * 1024
MAX_HEADER_LINES = 100
MAX_IDLE_PER_ORIGIN = 16


class HttpError(Exception):
    """The exchange failed (connection, framing, timeout); nothing was confirmed."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass(slots=True)
class Http1Client:
    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    _idle: dict[tuple[str, str, int, str], list[_Connection]] = field(default_factory=dict)

    async def close(self) -> None:
        for connections in self._idle.values():
            for conn in connections:
                conn.close()
        self._idle.clear()

    async def post(self, *, scheme: str, host: str, port: int, address: str, target: str,
                   headers: list[tuple[str, str]], body: bytes, deadline_s: float) -> int:
        """POST ``body`` to ``target`` (path and query) on ``address``; the status code.

        The whole exchange must end within ``deadline_s`` (``TimeoutError``).
        """
        key = (scheme, host, port, address)
        request = _request(host, port, scheme, target, headers, body)
        async with asyncio.timeout(deadline_s):
            conn = self._take(key)
            if conn is not None:
                try:
                    return await self._exchange(key, conn, request)
                except HttpError:
                    pass  # a kept-alive connection the server had closed: once more, fresh
            conn = await self._connect(scheme, host, port, address, deadline_s)
            return await self._exchange(key, conn, request)

    def _take(self, key: tuple[str, str, int, str]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    async def _connect(self, scheme: str, host: str, port: int, address: str,
                       handshake_s: float) -> _Connection:
        try:
            if scheme == "https":
                reader, writer = await asyncio.open_connection(
                    address, port, ssl=self.ssl_context, server_hostname=host,
                    ssl_handshake_timeout=handshake_s)
            else:
                reader, writer = await asyncio.open_connection(address, port)
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"cannot connect to {address}:{port} ({exc})") from exc
        return _Connection(reader, writer)

    async def _exchange(self, key: tuple[str, str, int, str], conn: _Connection,
                        request: bytes) -> int:
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            status, reusable = await _response(conn.reader)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ssl.SSLError) as exc:
            conn.close()
            raise HttpError(f"{type(exc).__name__}: {exc}"[:200]) from exc
        except BaseException:
            conn.close()  # cancelled or timed out mid-exchange: the framing is unknown
            raise
        idle = self._idle.setdefault(key, [])
        if reusable and len(idle) < MAX_IDLE_PER_ORIGIN:
            idle.append(conn)
        else:
            conn.close()
        return status


def _request(host: str, port: int, scheme: str, target: str,
             headers: list[tuple[str, str]], body: bytes) -> bytes:
    authority = f"[{host}]" if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        authority += f":{port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}",
             f"Content-Length: {len(body)}", "Connection: keep-alive"]
    lines += [f"{name}: {value}" for name, value in headers]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if any(c in head[:-4].replace("\r\n", "") for c in "\r\n\0"):
        raise ValueError("header injection")
    return head.encode("latin-1") + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status, whether the connection may be reused)."""
    while True:
        line = await reader.readuntil(b"\r\n")
        version, _, rest = line.decode("latin-1").strip().partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {line[:60]!r}")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES + 1):
            raw = await reader.readuntil(b"\r\n")
            if raw == b"\r\n":
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ValueError("too many header lines")
        if 100 <= status < 200:
            continue  # informational: the real answer follows
        break
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if status in (204, 304):
        return status, keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return status, keep
            total += size
            if total > MAX_BODY:
                return status, False
            await reader.readexactly(size + 2)
    length = headers.get("content-length")
    if length is not None:
        n = int(length)
        if n > MAX_BODY:
            return status, False
        await reader.readexactly(n)
        return status, keep
    return status, False  # delimited by close: no need to wait for it, just close
