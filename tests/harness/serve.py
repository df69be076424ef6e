"""``elmtrain serve`` as a real process on loopback, for tests and ``bench.serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.controlplane import free_port


@dataclass
class Served:
    url: str  # http://127.0.0.1:port
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_revision(self, revision: int | None, timeout: float = 120) -> None:
        """Until ``/readyz`` says the server serves ``revision`` (or a later one); None: until
        it answers at all (``/healthz``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"elmtrain serve exited: {self.log.read_text()[-3000:]}")
            try:
                status, body = self.get("/readyz" if revision is not None else "/healthz")
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                status, body = 0, {}
            if status == 200 and (revision is None or body.get("revision", -1) >= revision):
                return
            time.sleep(0.1)
        raise AssertionError(f"not serving revision {revision}: {self.log.read_text()[-3000:]}")


@contextmanager
def serving(
    forest: str, log_dir: Path, *extra: str, ready: bool = True, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """The server, once it serves (``ready``) or at least answers (``/healthz``)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "elmtrain",
                "serve",
                "--forest",
                forest,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        served.wait_revision(0 if ready else None)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
