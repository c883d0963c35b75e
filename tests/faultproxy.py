"""A fault-injecting HTTP/1.1 reverse proxy for tests, plus a helper serving an ASGI app on loopback.

    rule = lambda method, path, attempt: Fault.status(503) if attempt <= 2 else None
    async with FaultProxy(upstream_url, rule) as proxy:   # or `with FaultProxy(...)` (own thread)
        ... talk to proxy.url instead of upstream_url ...
        assert proxy.count("GET", "/plugins") == 3

For every request the proxy calls `rule(method, path, attempt)` where `path` excludes the query
string and `attempt` counts the requests with this (method, path) so far, this one included
(1-based). The rule answers None (forward untouched) or a `Fault`:

* `Fault.drop()`            close the connection without answering (after_upstream=True: the
                            upstream handles the request, then its answer is lost);
* `Fault.stall(seconds)`    wait, then forward (after_upstream=True: forward, then wait before
                            answering); never longer than the proxy's `max_stall`;
* `Fault.status(503)`       answer this status (with `body`/`headers`) without asking upstream;
* `Fault.truncate(keep)`    forward, answer the headers with the full Content-Length but only
                            `keep` bytes of body (an int, or a float = fraction), then close;
* `Fault.flip(count)`       forward, invert `count` bytes of the answer body (same length);
* `Fault.corrupt_request(count)`  invert `count` bytes of the request body on the way up.

Only 127.0.0.1 is listened on. Everything stops at context exit: the listener, pending stalls
and open connections. The proxy answers with Content-Length framing (never chunked) and passes
bodies as raw bytes (no decoding): what the upstream sent is what the client gets, faults aside.
Absolute-form targets (`GET http://host/path`) are accepted too, so the proxy can also stand for
the `HttpProxy` of a configuration.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
import h11
import httpx
import uvicorn
from anyio.abc import SocketAttribute, SocketStream

__all__ = ["Exchange", "Fault", "FaultProxy", "Rule", "serve_app"]

_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"host",
}


@dataclass(frozen=True)
class Fault:
    """What to do to one request; build with the class methods."""

    kind: str  # drop | stall | status | truncate | flip | corrupt_request
    seconds: float = 0.0
    status_code: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    keep: int | float = 0.5
    count: int = 1
    after_upstream: bool = False

    @classmethod
    def drop(cls, *, after_upstream: bool = False) -> "Fault":
        return cls("drop", after_upstream=after_upstream)

    @classmethod
    def stall(cls, seconds: float, *, after_upstream: bool = False) -> "Fault":
        return cls("stall", seconds=seconds, after_upstream=after_upstream)

    @classmethod
    def status(cls, status_code: int = 503, body: bytes = b"fault injected by the test proxy",
               headers: dict[str, str] | None = None) -> "Fault":
        return cls("status", status_code=status_code, body=body,
                   headers=tuple((headers or {}).items()))

    @classmethod
    def truncate(cls, keep: int | float = 0.5) -> "Fault":
        return cls("truncate", keep=keep)

    @classmethod
    def flip(cls, count: int = 1) -> "Fault":
        return cls("flip", count=count)

    @classmethod
    def corrupt_request(cls, count: int = 1) -> "Fault":
        return cls("corrupt_request", count=count)


Rule = Callable[[str, str, int], "Fault | None"]


@dataclass
class Exchange:
    """One request seen by the proxy, for assertions."""

    method: str
    path: str
    target: str
    attempt: int
    fault: Fault | None
    request_headers: list[tuple[str, str]]
    request_body_size: int
    upstream_status: int | None = None  # None: upstream not asked (or it failed)
    sent_status: int | None = None  # status line the client got (None: dropped before)
    notes: list[str] = field(default_factory=list)


def flip_bytes(data: bytes, count: int) -> bytes:
    """`data` with `count` bytes inverted at evenly spread positions (deterministic)."""
    if not data or count <= 0:
        return data
    out = bytearray(data)
    count = min(count, len(out))
    for i in range(count):
        out[(len(out) * (2 * i + 1)) // (2 * count)] ^= 0xFF
    return bytes(out)


class FaultProxy:
    """Reverse proxy to `upstream` on 127.0.0.1 applying `rule`; see the module docstring."""

    def __init__(self, upstream: str, rule: Rule | None = None, *, max_stall: float = 30.0,
                 upstream_timeout: float = 60.0, port: int = 0):
        self.upstream = upstream.rstrip("/")
        self.rule: Rule = rule or (lambda method, path, attempt: None)
        self.max_stall = max_stall
        self.upstream_timeout = upstream_timeout
        self.port = port
        self.exchanges: list[Exchange] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._portal_cm: Any = None
        self._thread_cm: Any = None
        self._async_cm: Any = None

    # -- assertions ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self._counts.get((method.upper(), path), 0)

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def faults(self) -> list[tuple[str, str, int, str]]:
        """(method, path, attempt, fault kind) of every request that got a fault."""
        with self._lock:
            return [(e.method, e.path, e.attempt, e.fault.kind)
                    for e in self.exchanges if e.fault is not None]

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self.exchanges.clear()

    # -- life cycle ------------------------------------------------------------------------

    async def __aenter__(self) -> "FaultProxy":
        self._async_cm = self._running()
        await self._async_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        cm, self._async_cm = self._async_cm, None
        await cm.__aexit__(*exc)

    def __enter__(self) -> "FaultProxy":
        """Run in a thread of its own (for synchronous tests or a blocked event loop)."""
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        portal = self._portal_cm.__enter__()
        try:
            self._thread_cm = portal.wrap_async_context_manager(self._running())
            self._thread_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._thread_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(SocketAttribute.local_port)
        client = httpx.AsyncClient(timeout=self.upstream_timeout, trust_env=False)
        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(listener.serve, lambda stream: self._connection(stream, client))
                try:
                    yield
                except BaseException as exc:  # re-raised below, not wrapped in an ExceptionGroup
                    failure = exc
                finally:
                    group.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                await client.aclose()

    # -- serving ---------------------------------------------------------------------------

    async def _connection(self, stream: SocketStream, client: httpx.AsyncClient) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                received = await self._read_request(conn, stream)
                if received is None:
                    return
                keep_open = await self._exchange(conn, stream, client, *received)
                if not keep_open or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                h11.ProtocolError, ConnectionError, OSError):
            return
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    @staticmethod
    async def _next_event(conn: h11.Connection, stream: SocketStream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await stream.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)

    async def _read_request(self, conn: h11.Connection, stream: SocketStream
                            ) -> tuple[h11.Request, bytes] | None:
        event = await self._next_event(conn, stream)
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed (idle keep-alive connection closed by the client)
        parts: list[bytes] = []
        while True:
            part = await self._next_event(conn, stream)
            if isinstance(part, h11.Data):
                parts.append(bytes(part.data))
            elif isinstance(part, h11.EndOfMessage):
                return event, b"".join(parts)
            else:
                return None

    def _decide(self, method: str, path: str, target: str, headers: list[tuple[str, str]],
                body: bytes) -> Exchange:
        with self._lock:
            attempt = self._counts.get((method, path), 0) + 1
            self._counts[(method, path)] = attempt
        fault = self.rule(method, path, attempt)
        exchange = Exchange(method, path, target, attempt, fault, headers, len(body))
        with self._lock:
            self.exchanges.append(exchange)
        return exchange

    async def _exchange(self, conn: h11.Connection, stream: SocketStream, client: httpx.AsyncClient,
                        request: h11.Request, body: bytes) -> bool:
        """Serve one request; False means: close the connection now."""
        method = request.method.decode("ascii")
        target = request.target.decode("latin-1")
        if not target.startswith("/"):  # absolute form: we are used as an HTTP proxy
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path = target.split("?", 1)[0]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        exchange = self._decide(method, path, target, headers, body)
        fault = exchange.fault
        kind = fault.kind if fault else None

        if kind == "drop" and not fault.after_upstream:
            return False
        if kind == "stall" and not fault.after_upstream:
            await anyio.sleep(min(fault.seconds, self.max_stall))
        if kind == "status":
            exchange.sent_status = fault.status_code
            answer_headers = [(k.encode(), v.encode()) for k, v in fault.headers]
            await self._answer(conn, stream, method, fault.status_code, answer_headers, fault.body)
            return True
        if kind == "corrupt_request":
            body = flip_bytes(body, fault.count)

        try:
            status, reason, answer_headers, answer = await self._forward(client, request, target, body)
        except httpx.HTTPError as exc:
            exchange.notes.append(f"upstream failed: {type(exc).__name__}: {exc}")
            exchange.sent_status = 502
            await self._answer(conn, stream, method, 502, [(b"content-type", b"text/plain")],
                               f"upstream failed: {type(exc).__name__}".encode())
            return False
        exchange.upstream_status = status

        if kind == "drop":
            return False
        if kind == "stall":
            await anyio.sleep(min(fault.seconds, self.max_stall))
        if kind == "flip":
            answer = flip_bytes(answer, fault.count)
        exchange.sent_status = status
        if kind == "truncate":
            keep = fault.keep if isinstance(fault.keep, int) else int(len(answer) * fault.keep)
            keep = max(0, min(keep, len(answer) - 1))
            exchange.notes.append(f"sent {keep} of {len(answer)} body bytes")
            await self._answer(conn, stream, method, status, answer_headers, answer, reason,
                               send_only=keep)
            return False
        await self._answer(conn, stream, method, status, answer_headers, answer, reason)
        return True

    async def _forward(self, client: httpx.AsyncClient, request: h11.Request, target: str,
                       body: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        headers = [(k, v) for k, v in request.headers
                   if k.lower() not in _HOP_BY_HOP
                   and not (k.lower() == b"expect" and v.lower() == b"100-continue")]
        upstream_request = httpx.Request(request.method.decode("ascii"), self.upstream + target,
                                         headers=headers, content=body)
        response = await client.send(upstream_request, stream=True)
        try:
            answer = b"".join([part async for part in response.aiter_raw()])
        finally:
            await response.aclose()
        answer_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
        reason = response.extensions.get("reason_phrase", b"")
        return response.status_code, reason, answer_headers, answer

    @staticmethod
    async def _answer(conn: h11.Connection, stream: SocketStream, method: str, status: int,
                      headers: list[tuple[bytes, bytes]], body: bytes, reason: bytes = b"",
                      send_only: int | None = None) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        if not reason:
            with contextlib.suppress(ValueError):
                reason = HTTPStatus(status).phrase.encode()
        await stream.send(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
        if method == "HEAD":
            await stream.send(conn.send(h11.EndOfMessage()))
            return
        data = body if send_only is None else body[:send_only]
        if data:
            await stream.send(conn.send(h11.Data(data=data)))
        if send_only is None:
            await stream.send(conn.send(h11.EndOfMessage()))


# -- an ASGI app served on loopback, in a thread -----------------------------------------------

@contextlib.contextmanager
def serve_app(app: Any, *, host: str = "127.0.0.1", start_timeout: float = 10.0,
              tls: dict[str, Any] | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on `host` (a free port) in a background thread; yields its URL
    (no trailing slash). Usable from sync and async tests alike; stops at exit.

    `tls`: uvicorn's ssl options without the `ssl_` prefix (certfile, keyfile, ca_certs,
    cert_reqs); the URL is then https."""
    if not host.startswith("127."):
        raise ValueError("tests serve on loopback only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    ssl_options = {f"ssl_{key}": value for key, value in (tls or {}).items()}
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, http="h11",
                            loop="asyncio", timeout_graceful_shutdown=1, **ssl_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"serve_app:{port}")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test app did not start on {host}:{port}")
            time.sleep(0.01)
        yield f"{'https' if tls else 'http'}://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        sock.close()
