"""A rest-hook receiver for tests: a real HTTP server on loopback that records what arrives."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.fhir import json as fjson

_MODEL: list[Any] = []


def _bundle(body: bytes, content_type: str) -> dict[str, Any]:
    """A notification as JSON; one sent in FHIR XML read with the gateway's reader."""
    if not content_type.startswith("application/fhir+xml"):
        return dict(json.loads(body))
    from gateway.fhir import xml as fhir_xml
    from gateway.fhir.validation import FhirValidator
    from gateway.main import profiles_dir, registry
    from gateway.settings import Settings

    if not _MODEL:
        _MODEL.append(FhirValidator.load(profiles_dir(), registry().structure_definitions,
                                         Settings.from_env()).model)
    return dict(json.loads(fjson.dumps(fhir_xml.loads(body, _MODEL[0]))))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    bundle: dict[str, Any]
    at: float

    @property
    def status(self) -> dict[str, Any]:
        return self.bundle["entry"][0]["resource"]

    def param(self, name: str) -> Any:
        for p in self.status["parameter"]:
            if p["name"] == name:
                return next((v for k, v in p.items() if k.startswith("value")), None)
        return None

    @property
    def type(self) -> str:
        return str(self.param("type"))

    @property
    def subscription_id(self) -> str:
        return str(self.param("subscription")["reference"]).rsplit("/", 1)[-1]

    def events(self) -> list[tuple[int, str | None]]:
        """(event number, focus reference) of each notification-event."""
        out = []
        for p in self.status["parameter"]:
            if p["name"] != "notification-event":
                continue
            parts = {q["name"]: q for q in p["part"]}
            focus = parts.get("focus", {}).get("valueReference", {}).get("reference")
            out.append((int(parts["event-number"]["valueString"]), focus))
        return out


@dataclass
class Receiver:
    """Answers ``status`` (200) to every POST; ``down()`` closes the port."""

    status: int = 200
    delay: float = 0.0
    port: int = 0
    received: list[Received] = field(default_factory=list)
    answer: Callable[[Received], int] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                               body, _bundle(body, self.headers.get("Content-Type", "")),
                               time.time())
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.answer(got) if receiver.answer else receiver.status
                if 200 <= status < 300:
                    with receiver._lock:
                        receiver.received.append(got)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of(self, sid: str, kind: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received
                    if r.subscription_id == sid and (kind is None or r.type == kind)]

    def event_numbers(self, sid: str) -> list[int]:
        return [n for r in self.of(sid, "event-notification") for n, _ in r.events()]

    def wait(self, check: Callable[[], bool], within: float = 20.0) -> bool:
        deadline = time.monotonic() + within
        for _ in itertools.count():
            if check():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return False
