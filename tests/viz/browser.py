"""A real headless chromium, driven over the Chrome DevTools Protocol, for the page tests.

The protocol runs over a pipe (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4,
JSON messages ended by a NUL byte), so the tests need no websocket library and open no port.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# The launch flags of the environment notes: no sandbox (we run as root), nothing in the
# background that would reach for the network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """Path of Debian's chromium (or another Chrome), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


CHROMIUM = find_chromium()
#: Skips a page test where chromium is absent, except under CI, where that is a failure.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium; .ci/run does)")


def start_browser() -> Browser:
    """A running headless chromium; fails (not skips) the test where there is none."""
    if CHROMIUM is None:
        pytest.fail("CI is set but chromium is missing: .ci/run should have installed it")
    return Browser(CHROMIUM)


class Browser:
    """One chromium process with one page (tab); ``call`` sends a protocol command to it."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 1000) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="maskedattn-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def to_fds_3_and_4() -> None:  # runs in the child, before exec
            # Out of the way first, in case the pipe ends themselves sit on fds 3 and 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._process = subprocess.Popen(
            [executable, *FLAGS, f"--window-size={width},{height}",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # close_fds=False: it would close fds 3 and 4 after the dup2 above. Python's own
            # descriptors are not inheritable, so nothing else leaks into chromium.
            preexec_fn=to_fds_3_and_4, close_fds=False,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank", session=False)["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True,
                                  session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, *, session: bool = True, timeout: float = 30.0, **params) -> dict:
        """Send one command and wait for its result (events met on the way are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, *, timeout: float = 30.0) -> dict:
        """The first event named ``method`` (already received or still to come)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            reply = self._read(deadline, method)
            if "method" in reply:
                self.events.append(reply)

    def evaluate(self, expression: str, *, timeout: float = 30.0):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path, *, ready: str = "document.body.dataset.ready === '1'",
             timeout: float = 30.0) -> None:
        """Navigate to a local file and wait until the page says it is ready."""
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired", timeout=timeout)
        self.evaluate(f"""new Promise((resolve, reject) => {{
            const t0 = performance.now();
            (function poll() {{
                if ({ready}) resolve(true);
                else if (document.body && document.body.dataset.error)
                    reject(new Error(document.body.dataset.error));
                else if (performance.now() - t0 > {timeout * 1000}) reject(new Error("not ready"));
                else setTimeout(poll, 10);
            }})();
        }})""", timeout=timeout)

    def mouse_move(self, x: float, y: float) -> None:
        """A real pointer move to page coordinates (fires mouseover/mousemove)."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, x: float, y: float) -> None:
        """A real left click at page coordinates."""
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def center_of(self, selector: str) -> tuple[float, float]:
        """Viewport coordinates of the centre of the first element matching ``selector``,
        scrolled into view first."""
        box = self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            el.scrollIntoView({{block: "center", inline: "center"}});
            const b = el.getBoundingClientRect();
            return [b.left + b.width / 2, b.top + b.height / 2];
        }})()""")
        return box[0], box[1]

    @contextlib.contextmanager
    def inside_iframe(self):
        """Inside the block, commands go to the page's iframe (chromium runs a sandboxed iframe
        as a target of its own, so the page's session cannot reach into it)."""
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        frame = next(t["targetId"] for t in targets if t["type"] == "iframe")
        session = self.call("Target.attachToTarget", targetId=frame, flatten=True,
                            session=False)["sessionId"]
        page, self._session = self._session, session
        try:
            yield
        finally:
            self._session = page

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """End the chromium process started by this object, and remove its profile."""
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", session=False, timeout=5)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._profile.cleanup()

    def _read(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {waiting_for} in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited while we waited for {waiting_for}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)
