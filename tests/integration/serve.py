"""Run ``carepath serve`` as a real subprocess for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, env: dict[str, str], workers: int = 1, cwd: Path | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.env = {**os.environ, **env}
        self.workers = workers
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after: float | None = None

    def __enter__(self) -> Served:
        if self.proc is None:
            self.start()
        if self.ready_after is None:
            self.wait_ready()
        return self

    def start(self) -> None:
        self.started = time.monotonic()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(self.port),
             "--workers", str(self.workers), *self.args],
            env=self.env, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> Served:
        assert self.proc is not None
        started = self.started
        deadline = started + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                self.log.close()
                raise RuntimeError(f"carepath serve exited: {output[-2000:]}")
            try:
                if httpx.get(f"{self.url}/metadata", timeout=1).status_code == 200:
                    self.ready_after = time.monotonic() - started
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("carepath serve did not answer /fhir/metadata within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")
