"""Run one of our FastAPI apps on a real uvicorn server on a free loopback port, inside the test process."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx

from tests.conftest import free_port


@contextmanager
def running(app):
    """Yields the server's base URL (http://127.0.0.1:PORT); stops the server on the way out."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/health", timeout=1.0)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """A server's GET /metrics, read with Prometheus's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    got = httpx.get(f"{url}/metrics", timeout=10)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain"), got.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(got.text) for s in family.samples}
