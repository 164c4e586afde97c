"""The websocket channel: https://hl7.org/fhir/uv/subscriptions-backport/channels.html#websockets

A client gets a token from ``$get-ws-binding-token``, opens the websocket at
``{base}/$websocket`` and sends ``bind-with-token <token>``. The gateway
answers with one ``handshake`` notification per subscription of the token,
then sends that subscription's pending events (from ``delivered_number``)
and every new one, as JSON text messages. ``unbind-with-token <token>``
stops them. Tokens live in the database, so any process can bind; the
process holding the socket delivers (others leave websocket work alone).

Delivery counts as done once the message is written to the socket; a client
that reconnects catches up from ``delivered_number``, or replays with
``$events``.

The socket object is anything with ``accept``, ``receive_text``,
``send_text`` and ``close`` (Starlette's ``WebSocket``, wired in
``gateway.main``), so this module knows no web framework.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.storage import subscription_tables as tables
from gateway.storage.db import Database
from gateway.subscriptions.notification import dumps, notification
from gateway.subscriptions.operations import token_hash
from gateway.subscriptions.subscription import SubscriptionConfig
from gateway.subscriptions.topics import TopicRegistry

log = logging.getLogger("carepath.subscriptions")


class Socket(Protocol):
    async def accept(self) -> None: ...
    async def receive_text(self) -> str: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000) -> None: ...


class WebSocketHub:
    def __init__(self, db: Database, topics: TopicRegistry, *, base_url: str,
                 kick: Callable[[set[str]], None]) -> None:
        self.db = db
        self.topics = topics
        self.base_url = base_url.rstrip("/")
        self.kick = kick
        self._bound: dict[str, list[Socket]] = {}

    def bound(self, sid: str) -> bool:
        return bool(self._bound.get(sid))

    async def send(self, sid: str, body: bytes) -> bool:
        """Write one notification to every socket bound to ``sid``; True if one took it."""
        delivered = False
        for socket in list(self._bound.get(sid, [])):
            try:
                await socket.send_text(body.decode())
                delivered = True
            except Exception:
                self._unbind(sid, socket)
        return delivered

    def _unbind(self, sid: str, socket: Socket) -> None:
        sockets = self._bound.get(sid, [])
        if socket in sockets:
            sockets.remove(socket)
        if not sockets:
            self._bound.pop(sid, None)

    async def serve(self, socket: Socket) -> None:
        await socket.accept()
        mine: set[str] = set()
        try:
            while True:
                message = (await socket.receive_text()).strip()
                verb, _, token = message.partition(" ")
                if verb not in ("bind-with-token", "unbind-with-token"):
                    await socket.send_text(f"error unknown command {verb[:40]!r}")
                    continue
                async with self.db.read() as conn:
                    ids = await tables.load_ws_token(conn, token_hash(token.strip()),
                                                     int(time.time() * 1_000_000))
                if ids is None:
                    await socket.send_text("error invalid or expired token")
                    continue
                subscriptions = [i for i in ids.split(",") if i]
                if verb == "unbind-with-token":
                    for sid in subscriptions:
                        self._unbind(sid, socket)
                        mine.discard(sid)
                    continue
                for sid in subscriptions:
                    await self._handshake(socket, sid)
                    self._bound.setdefault(sid, []).append(socket)
                    mine.add(sid)
                self.kick(set(subscriptions))
        except Exception as exc:  # the client went away (WebSocketDisconnect and kin)
            log.debug("websocket closed: %s", exc)
        finally:
            for sid in mine:
                self._unbind(sid, socket)

    async def _handshake(self, socket: Socket, sid: str) -> None:
        async with self.db.read() as conn:
            state = await tables.get_state(conn, sid)
        if state is None:
            return
        config = SubscriptionConfig.from_json(state.config, self.topics)
        bundle = notification(base=self.base_url, subscription_id=sid, topic=config.topic,
                              status=state.status, type_="handshake",
                              events_since_start=state.events_since_start, events=[],
                              content=config.content, now=int(time.time() * 1_000_000))
        await socket.send_text(dumps(bundle).decode())
