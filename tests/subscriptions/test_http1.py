"""The notification HTTP client against a raw server: framing, reuse, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.subscriptions.http1 import MAX_BODY, Http1Client, HttpError

Answer = Callable[[int], bytes]


async def serve(answer: Answer) -> tuple[asyncio.Server, int, list[bytes]]:
    """A server answering the n-th request on a connection with ``answer(n)``."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                seen.append(head + await reader.readexactly(length))
                n += 1
                writer.write(answer(n))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def post(client: Http1Client, port: int, body: bytes = b"{}") -> int:
    return await client.post(scheme="http", host="127.0.0.1", port=port, address="127.0.0.1",
                             target="/hook?x=1", headers=[("X-Test", "1")], body=body,
                             deadline_s=5)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
])
async def test_well_framed_answers_keep_the_connection(answer: bytes) -> None:
    server, port, seen = await serve(lambda n: answer)
    client = Http1Client()
    try:
        statuses = [await post(client, port) for _ in range(3)]
        assert statuses[0] in (200, 204) and len(set(statuses)) == 1
        assert len(seen) == 3
        assert sum(len(v) for v in client._idle.values()) == 1  # one connection, reused
        assert seen[0].startswith(b"POST /hook?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nX-Test: 1\r\n" in seen[0] and seen[0].endswith(b"\r\n\r\n{}")
    finally:
        await client.close()
        server.close()


async def test_close_and_oversized_answers_are_not_reused() -> None:
    big = b"x" * (MAX_BODY + 1)
    answers = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
               b"HTTP/1.0 302 Found\r\nLocation: http://169.254.169.254/\r\n\r\n"]
    for answer in answers:
        server, port, _seen = await serve(lambda n, a=answer: a)
        client = Http1Client()
        try:
            status = await post(client, port)
            assert status in (200, 500, 302)
            assert sum(len(v) for v in client._idle.values()) == 0
        finally:
            await client.close()
            server.close()


async def test_a_stale_kept_alive_connection_is_replaced_once() -> None:
    server, port, seen = await serve(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client = Http1Client()
    try:
        assert await post(client, port) == 200
        for conns in client._idle.values():  # the server side went away meanwhile
            for conn in conns:
                conn.reader.feed_eof()
        assert await post(client, port) == 200
        assert len(seen) == 2
    finally:
        await client.close()
        server.close()


async def test_garbage_and_refusals_are_errors_and_silence_times_out() -> None:
    server, port, _ = await serve(lambda n: b"SSH-2.0-OpenSSH\r\n")
    client = Http1Client()
    try:
        with pytest.raises(HttpError):
            await post(client, port)
        server.close()
        await server.wait_closed()
        with pytest.raises(HttpError):
            await post(client, port)
        quiet, quiet_port, _ = await serve(lambda n: b"")
        with pytest.raises(TimeoutError):
            await client.post(scheme="http", host="127.0.0.1", port=quiet_port,
                              address="127.0.0.1", target="/", headers=[], body=b"",
                              deadline_s=0.3)
        quiet.close()
    finally:
        await client.close()
