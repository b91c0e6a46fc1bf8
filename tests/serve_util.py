"""Helpers for the serve tests: a real uvicorn server on a free 127.0.0.1 port (in a thread of the test process,
so the built-in model loads once per server), PNG decoding, and SSE parsing."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
from PIL import Image


def post(url: str, path: str, timeout: float = 60, **kw):
    return httpx.post(url + path, timeout=timeout, **kw)


def alone(pipe, prompt, **kw):
    """The same request in process: what a served image must equal."""
    return pipe(prompt, progress=False, output_type="np", **kw).images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(config, ready_timeout: float = 60.0):
    """uvicorn + create_app(config) on 127.0.0.1:<free port>; yields the base URL once /readyz says ready."""
    import uvicorn

    from sdrt.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + ready_timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            server.should_exit = True
            raise TimeoutError(f"server on {url} not ready in {ready_timeout} s")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sse_events(url: str, headers=None, timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Read a Server-Sent Events stream to its end: [(event, data), ...] (pings skipped)."""
    events, event, data = [], None, []
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and event is not None:
                events.append((event, json.loads("\n".join(data)) if data else None))
                event, data = None, []
    return events


def wait_for(predicate, timeout: float = 30.0, every: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")
