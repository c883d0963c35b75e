"""The fault proxy really does what it says, against a tiny upstream app on loopback."""

from __future__ import annotations

import hashlib
import threading
import time

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.faultproxy import Fault, FaultProxy, flip_bytes, serve_app

pytestmark = pytest.mark.anyio

DATA = (bytes(range(256)) * 8)[:1000]


class Upstream:
    """A tiny app that remembers what reached it."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def app(self) -> Starlette:
        async def data(request: Request) -> Response:
            self._hit(request)
            return Response(DATA, media_type="application/octet-stream")

        async def echo(request: Request) -> Response:
            body = await request.body()
            self._hit(request, body)
            return JSONResponse({"md5": hashlib.md5(body).hexdigest(), "size": len(body)})

        async def headers(request: Request) -> Response:
            self._hit(request)
            return JSONResponse(dict(request.headers))

        return Starlette(routes=[
            Route("/data", data, methods=["GET"]),
            Route("/echo", echo, methods=["PUT", "POST"]),
            Route("/headers", headers, methods=["GET"]),
        ])

    def _hit(self, request: Request, body: bytes = b"") -> None:
        with self._lock:
            self.hits.append((request.method, request.url.path))
            self.bodies.append(body)


@pytest.fixture
def upstream():
    up = Upstream()
    with serve_app(up.app()) as url:
        up.url = url
        yield up


def client(**kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, **kwargs)


async def test_pass_through_counts_and_attempts(upstream):
    seen = []

    def rule(method, path, attempt):
        seen.append((method, path, attempt))
        return None

    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, rule) as proxy, client() as http:
            for _ in range(3):  # one keep-alive connection, three requests
                r = await http.get(proxy.url + "/data?x=1")
                assert r.status_code == 200 and r.content == DATA
            r = await http.put(proxy.url + "/echo", content=b"abc")
            assert r.json() == {"md5": hashlib.md5(b"abc").hexdigest(), "size": 3}
            r = await http.get(proxy.url + "/headers", headers={"X-Custom": "v"})
            assert r.json()["x-custom"] == "v"
            assert r.json()["host"] == upstream.url.removeprefix("http://")
    assert seen == [("GET", "/data", 1), ("GET", "/data", 2), ("GET", "/data", 3),
                    ("PUT", "/echo", 1), ("GET", "/headers", 1)]
    assert proxy.count("GET", "/data") == 3 and proxy.count("PUT", "/echo") == 1
    assert proxy.counts == {("GET", "/data"): 3, ("PUT", "/echo"): 1, ("GET", "/headers"): 1}
    assert proxy.faults() == []
    assert proxy.exchanges[0].target == "/data?x=1"
    assert upstream.hits.count(("GET", "/data")) == 3


async def test_drop_before_answering(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, lambda m, p, a: Fault.drop()) as proxy, client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(proxy.url + "/data")
    assert upstream.hits == []  # dropped before the upstream was asked
    assert proxy.faults() == [("GET", "/data", 1, "drop")]


async def test_drop_after_upstream(upstream):
    rule = lambda m, p, a: Fault.drop(after_upstream=True)  # noqa: E731
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, rule) as proxy, client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.put(proxy.url + "/echo", content=b"payload")
    assert upstream.hits == [("PUT", "/echo")]  # the work was done, the answer lost
    assert proxy.exchanges[0].upstream_status == 200 and proxy.exchanges[0].sent_status is None


async def test_stall_then_answer_and_client_timeout(upstream):
    rule = lambda m, p, a: Fault.stall(0.6) if a == 1 else Fault.stall(0.3)  # noqa: E731
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, rule) as proxy, client() as http:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await http.get(proxy.url + "/data", timeout=0.2)
            assert time.monotonic() - start < 0.5
            start = time.monotonic()
            r = await http.get(proxy.url + "/data", timeout=5)
            assert r.content == DATA
            assert time.monotonic() - start >= 0.3
    assert proxy.count("GET", "/data") == 2


async def test_stall_is_bounded_by_max_stall(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, lambda m, p, a: Fault.stall(3600), max_stall=0.3) as proxy:
            async with client() as http:
                start = time.monotonic()
                r = await http.get(proxy.url + "/data", timeout=5)
                assert r.status_code == 200 and time.monotonic() - start < 3


async def test_stall_ends_at_exit(upstream):
    """A stalled request does not keep the proxy alive: exit cancels it."""
    with anyio.fail_after(10):
        async with client() as http:
            async with anyio.create_task_group() as group:
                async with FaultProxy(upstream.url, lambda m, p, a: Fault.stall(3600)) as proxy:
                    failures = []

                    async def call():
                        try:
                            await http.get(proxy.url + "/data", timeout=8)
                        except httpx.HTTPError as exc:
                            failures.append(exc)

                    group.start_soon(call)
                    while proxy.count("GET", "/data") == 0:
                        await anyio.sleep(0.01)
                    start = time.monotonic()
            assert time.monotonic() - start < 2
            assert len(failures) == 1


async def test_status_answer_without_upstream(upstream):
    def rule(method, path, attempt):
        return Fault.status(503, b"busy", {"Retry-After": "1"}) if (path, attempt) == ("/data", 1) else None

    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, rule) as proxy, client() as http:
            r = await http.get(proxy.url + "/data")
            assert (r.status_code, r.content, r.headers["retry-after"]) == (503, b"busy", "1")
            assert r.reason_phrase == "Service Unavailable"
            r = await http.get(proxy.url + "/data")  # same connection still usable
            assert r.status_code == 200
            assert r.reason_phrase == "OK"
            r = await http.get(proxy.url + "/headers")
            assert r.status_code == 200
    assert upstream.hits == [("GET", "/data"), ("GET", "/headers")]


async def test_truncate_sends_full_content_length_then_less(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, lambda m, p, a: Fault.truncate(300)) as proxy:
            async with client() as http:
                with pytest.raises(httpx.RemoteProtocolError):
                    await http.get(proxy.url + "/data")
            # The raw bytes: full Content-Length announced, 300 body bytes, then the close.
            stream = await anyio.connect_tcp("127.0.0.1", proxy.port)
            async with stream:
                await stream.send(b"GET /data HTTP/1.1\r\nHost: x\r\n\r\n")
                raw = b""
                while True:
                    try:
                        raw += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000" in head.lower()
    assert body == DATA[:300]
    assert proxy.faults() == [("GET", "/data", 1, "truncate"), ("GET", "/data", 2, "truncate")]


async def test_truncate_fraction(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, lambda m, p, a: Fault.truncate(0.5)) as proxy:
            async with client() as http:
                async with http.stream("GET", proxy.url + "/data") as r:
                    assert r.headers["content-length"] == "1000"
                    got = b""
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for part in r.aiter_raw():
                            got += part
    assert got == DATA[:500]


async def test_flip_keeps_length_changes_bytes(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, lambda m, p, a: Fault.flip(3)) as proxy, client() as http:
            r = await http.get(proxy.url + "/data")
    assert r.status_code == 200 and len(r.content) == len(DATA)
    assert sum(a != b for a, b in zip(r.content, DATA)) == 3
    assert flip_bytes(r.content, 3) == DATA  # flipping is its own inverse


async def test_corrupt_request_body_on_the_way_up(upstream):
    body = b"x" * 4096
    rule = lambda m, p, a: Fault.corrupt_request(2) if m == "PUT" else None  # noqa: E731
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, rule) as proxy, client() as http:
            r = await http.put(proxy.url + "/echo", content=body)
    assert r.json()["size"] == len(body)
    assert r.json()["md5"] != hashlib.md5(body).hexdigest()
    received = upstream.bodies[-1]
    assert sum(a != b for a, b in zip(received, body)) == 2


async def test_stops_at_exit(upstream):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            port = proxy.port
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/data")


async def test_usable_as_http_proxy(upstream):
    """Absolute-form targets: the proxy can stand for a configuration's HttpProxy."""
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy, client(proxy=proxy.url) as http:
            r = await http.get("http://127.0.0.1:9/data")  # nothing listens there: via proxy only
    assert r.content == DATA
    assert proxy.count("GET", "/data") == 1


def test_thread_mode_with_a_sync_client(upstream):
    rule = lambda m, p, a: Fault.status(500) if a == 1 else None  # noqa: E731
    with FaultProxy(upstream.url, rule) as proxy, httpx.Client(trust_env=False, timeout=5) as http:
        assert http.get(proxy.url + "/data").status_code == 500
        assert http.get(proxy.url + "/data").content == DATA
        port = proxy.port
    assert proxy.count("GET", "/data") == 2
    with httpx.Client(trust_env=False, timeout=2) as http, pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/data")


def test_flip_bytes_positions():
    assert flip_bytes(b"", 3) == b""
    assert flip_bytes(b"\x00\x00\x00\x00", 1) == b"\x00\x00\xff\x00"
    assert flip_bytes(b"\x00", 5) == b"\xff"
