"""Helpers for the browser end-to-end tests (tests/test_browser.py).

- ``chromium()``: the system Chromium (``/usr/bin/chromium``) driven by Playwright's async
  API; a missing browser is a test failure that says how to install it, never a skip.
- ``RestartableGateway``: ``python -m gateway`` on a port chosen once and kept across
  restarts, so that a page reconnects to the same address (``tests/procs.py`` picks a new
  port per process).
- ``Publisher``: a backend publishing over the HTTP API at a steady pace, tolerant of the
  gateway being down.
- ``join_chat`` / ``in_the_chat``: the chat page (/chat) joined under a name, and the wait
  until it is connected and lists that name online.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> str:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: install it with "
            "`apt-get install chromium` (Debian/Ubuntu)",
            pytrace=False,
        )
    return CHROMIUM


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium (playwright ``Browser``), closed with its driver on exit."""
    executable = require_chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need the `playwright` package: `.venv/bin/pip install -e '.[test]'` "
            "(it drives the system Chromium; do not run `playwright install`)",
            pytrace=False,
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def join_chat(page: Any, url: str, name: str) -> None:
    """Open the chat page at ``url``, join as ``name`` and wait until it is in the room."""
    await page.goto(url)
    await page.fill("[data-testid=name-input]", name)
    await page.click("[data-testid=join]")
    await in_the_chat(page, name)


async def in_the_chat(page: Any, name: str) -> None:
    """Wait until the chat page is connected and lists ``name`` online."""
    await page.wait_for_function(
        "name => document.querySelector('[data-testid=state]').dataset.state === 'connected' && "
        "[...document.querySelectorAll('[data-testid=online-user]')].some((u) => "
        "u.textContent === name)",
        arg=name,
        timeout=10_000,
    )


def wait_ready_sync(
    url: str, proc: subprocess.Popen[bytes], output: Any, timeout: float = 20.0
) -> None:
    """Poll ``/readyz`` until 200 (for synchronous fixtures)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{output()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
    raise TimeoutError(f"gateway not ready:\n{output()}")


class RestartableGateway:
    """``python -m gateway --port PORT`` that can be stopped and started again on PORT."""

    def __init__(self, env: Mapping[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.env.update(env)
        fd, self.log_path = tempfile.mkstemp(prefix="gateway-browser-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> RestartableGateway:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("gateway already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n----- start #{self.starts} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20.0) -> RestartableGateway:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited early:\n{self.output()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.url + "/readyz", timeout=2)).status_code == 200:
                        return self
                await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway not ready:\n{self.output()}")

    async def stop(self, *, graceful: bool = True, timeout: float = 15.0) -> int:
        """SIGTERM (drain: WebSockets closed with 1012, SSE streams ended) or SIGKILL;
        returns the exit status once the process is gone."""
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise TimeoutError(f"gateway did not exit within {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path)


class Publisher:
    """Publishes ``{"n": i}`` to ``channel`` every ``interval`` seconds over ``POST
    /api/publish`` and records every offset the gateway confirmed."""

    def __init__(self, url: str, channel: str, token: str, interval: float = 0.02) -> None:
        self.url = url
        self.channel = channel
        self.token = token
        self.interval = interval
        self.offsets: list[int] = []
        self.epochs: set[str] = set()
        self.failures = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name=f"publisher:{self.channel}")
        return self

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=5) as http:
            n = 0
            while not self._stop.is_set():
                try:
                    r = await http.post(
                        "/api/publish",
                        json={"channel": self.channel, "data": {"n": n}},
                        headers=headers,
                    )
                except httpx.TransportError:
                    self.failures += 1
                else:
                    assert r.status_code == 200, (r.status_code, r.text)
                    body = r.json()
                    self.offsets.append(body["offset"])
                    self.epochs.add(body["epoch"])
                    n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)

    async def stop(self) -> list[int]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.offsets
