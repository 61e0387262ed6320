"""Load a page from a file in headless Chromium and watch it over the DevTools protocol (a pipe, no port).

What the page logs to the console, every exception it throws, every network request it makes, and a
screenshot of the whole page: enough to test that a self-contained report really is self-contained.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@dataclass
class PageLoad:
    url: str
    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled / Log.entryAdded
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, itself included
    facts: dict[str, Any] = field(default_factory=dict)  # what a script run in the loaded page found

    @property
    def errors(self) -> list[str]:
        out = [
            f"{e.get('type') or e.get('level')}: {e.get('text') or e.get('args')}"
            for e in self.console
            if (e.get("type") or e.get("level")) in ("error", "assert", "warning")
        ]
        return out + [json.dumps(e.get("exceptionDetails", e))[:300] for e in self.exceptions]

    @property
    def outside_requests(self) -> list[str]:
        """Requests for anything but the page itself (inline data: URLs are not requests)."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class _DevTools:
    """The DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL, on fds 3 (in) and 4 (out)."""

    def __init__(self, browser: str, profile: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--mute-audio",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [
            (os.POSIX_SPAWN_DUP2, to_chrome_r, 3),
            (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
            (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2),
        ]
        self.pid = os.posix_spawn(browser, args, os.environ, file_actions=actions)
        for fd in (to_chrome_r, from_chrome_w, devnull):
            os.close(fd)
        self._next_id, self._buffer, self.events = 0, b"", []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match, timeout: float) -> dict:
        """Read messages until one matches (events are kept in ``events``)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the DevTools pipe")
            self._buffer += chunk

    def close(self) -> None:
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            time.sleep(0.1)
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self._to_chrome)
        os.close(self._from_chrome)


FACTS = """JSON.stringify({
  title: document.title,
  headings: [...document.querySelectorAll('section h2')].map(e => e.textContent),
  svgs: document.querySelectorAll('svg').length,
  tables: document.querySelectorAll('table').length,
  text: document.body.innerText,
  width: document.documentElement.scrollWidth,
  height: document.documentElement.scrollHeight,
})"""


def load_page(path: Path, screenshot: Path, *, width: int = 1200, browser: str | None = None, timeout: float = 60) -> PageLoad:
    """Open ``path`` in headless Chromium, wait for it to load, save a full-page PNG at ``screenshot``."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found (looked for {', '.join(BROWSERS)})")
    url = path.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="fedfuse-chromium-") as profile:
        tools = _DevTools(browser, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                tools.send(f"{domain}.enable", session=session)
            tools.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            tools.send("Page.navigate", {"url": url}, session=session)
            tools.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session, timeout)
            facts = json.loads(
                tools.send("Runtime.evaluate", {"expression": FACTS, "returnByValue": True}, session=session)["result"]["value"]
            )
            tools.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": int(facts["height"]), "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            time.sleep(0.2)  # late console messages
            tools.send("Runtime.evaluate", {"expression": "1"}, session=session)
        finally:
            tools.close()
    load = PageLoad(url=url, facts=facts)
    for event in tools.events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            load.console.append({"type": params.get("type"), "args": [a.get("value") for a in params.get("args", [])]})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            load.console.append({"level": entry.get("level"), "text": entry.get("text"), "url": entry.get("url")})
        elif method == "Runtime.exceptionThrown":
            load.exceptions.append(params)
        elif method == "Network.requestWillBeSent":
            load.requests.append(params.get("request", {}).get("url", ""))
    return load
