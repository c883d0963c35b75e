"""The HTTP server: uvicorn (uvloop + httptools) with the guards uvicorn lacks.

- A client has `HttpRequestTimeout` seconds to send a request's headers, and may not pause longer
  than that while it sends a body; otherwise its connection is closed. Without this, a client
  sending half a request line holds a connection forever, and a thousand of them starve everyone.
- Beyond `HttpMaxConnections` open connections, a new one is answered Orthanc's JSON 503
  (ServiceBusy, Retry-After) at once and closed: a flood costs one short answer per connection.
  uvicorn's `limit_concurrency` answers plain text, and only once the headers are in.
- A request that does not parse gets Orthanc's JSON 400 instead of uvicorn's plain text.
- A crash is logged once (see `_LoggedOnce`).
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from accelerator.api.http import error_body
from accelerator.config import Config
from protocol.errors import BadRequest, OrthancError, ServiceBusy

log = logging.getLogger(__name__)

RETRY_AFTER = 1  # seconds a refused client is asked to wait: slots free up as clients finish
LINGER = 1.0  # seconds a refused connection stays half-closed so that the client reads the 503
BUSY_LOG_INTERVAL = 60.0  # seconds between two warnings about refused connections


def uvicorn_config(config: Config, app: ASGIApp, *, verbose: bool = False) -> uvicorn.Config:
    """How `accelerator serve` runs `app` (tests start the real server with it too)."""
    return uvicorn.Config(
        _LoggedOnce(app),
        host=config.http_bind_address or "0.0.0.0",
        port=config.http_port,
        http=guarded_protocol(config),
        ws="none",  # an upgrade would hand the connection to a protocol without our guards
        log_config=None,  # uvicorn's records go through the daemon's logging (accelerator.cli)
        log_level="debug" if verbose else "warning",
        access_log=verbose,
        timeout_keep_alive=max(5, config.http_timeout),
    )


def guarded_protocol(config: Config) -> type[GuardedProtocol]:
    """The protocol class uvicorn instantiates per connection, with this configuration's limits."""
    return type("GuardedProtocol", (GuardedProtocol,), {
        "request_timeout": float(config.http_request_timeout),
        "max_connections": config.http_max_connections,
        "describe_errors": config.http_describe_errors,
    })


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline, a connection limit and JSON errors.

    One timer per connection watches the client while it owes us something: the headers of a
    request (a deadline from the connection or the request's first byte, not moved by trickled
    bytes), then its body (an idle timeout, moved by every byte received). Time during which we
    do not read (flow control, a pending `100 Continue`) is not the client's and does not count.
    """

    request_timeout = 30.0
    max_connections = 256
    describe_errors = True
    _busy_logged = -BUSY_LOG_INTERVAL

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._owed: str | None = None  # "headers", "body", or None when the client owes nothing
        self._due = 0.0  # loop time by which the client must have sent what it owes
        self._refused = False

    # -- the connection limit ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._expect("headers")

    def _refuse(self) -> None:
        """503 at once, then a half-close: closing outright while the client's request is unread
        would reset the connection and could destroy the answer before the client reads it."""
        self._refused = True
        self.connections.discard(self)  # a refused connection takes no slot
        self._log_busy()
        self._write_error(ServiceBusy(
            f"{len(self.connections)} connections are open, the limit (HttpMaxConnections) is "
            f"{self.max_connections}", headers={"Retry-After": str(RETRY_AFTER)}))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _log_busy(self) -> None:
        now = self.loop.time()
        if now - type(self)._busy_logged >= BUSY_LOG_INTERVAL:  # a flood must not flood the log
            type(self)._busy_logged = now
            log.warning("refusing connections: %d are open (HttpMaxConnections)", len(self.connections))

    # -- the request deadline --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # drained and dropped until the client closes or LINGER ends
        if self._owed == "body":
            self._due = self.loop.time() + self.request_timeout
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._owed != "headers":  # a new request on a kept-alive connection
            self._expect("headers")

    def on_headers_complete(self) -> None:
        self._expect("body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._owed = None
        self._cancel_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _expect(self, owed: str) -> None:
        self._owed, self._due = owed, self.loop.time() + self.request_timeout
        self._arm(self.request_timeout, self._check_client)

    def _check_client(self) -> None:
        self._timer = None
        if self._owed is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._we_are_not_reading():
            self._due = now + self.request_timeout
        if now < self._due:
            self._arm(self._due - now, self._check_client)
            return
        log.debug("closing the connection of %s: the request %s did not come within %g s",
                  self.client, self._owed, self.request_timeout)
        self.transport.close()

    def _we_are_not_reading(self) -> bool:
        waiting_for_us = self.cycle is not None and self.cycle.waiting_for_100_continue
        return self.flow.read_paused or (self._owed == "body" and waiting_for_us)

    def _arm(self, delay: float, callback) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- answers of the server itself ------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request that does not parse, in Orthanc's shape."""
        self._write_error(BadRequest(msg), uri=getattr(self, "url", b"").decode("latin-1"))
        self.transport.close()

    def _write_error(self, error: OrthancError, uri: str = "") -> None:
        body = error_body(error, "", uri, self.describe_errors)
        fields = [*self.server_state.default_headers,
                  *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
                  (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if body:
            fields.append((b"content-type", b"application/json"))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
        self.transport.write(STATUS_LINE[error.http_status] + head + b"\r\n" + body)


class _LoggedOnce:
    """Keep uvicorn from logging a crash a second time.

    Starlette's ServerErrorMiddleware hands every unexpected exception to our handler (which logs
    it with its traceback and answers Orthanc's 500), then re-raises it for the server to log;
    uvicorn would print a second traceback and close the connection. Once the answer is complete
    there is nothing left for uvicorn to do: the exception stops here. An answer cut short still
    reaches uvicorn, which must close the connection.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def sending(message) -> None:
            nonlocal answered
            await send(message)
            answered = message["type"] == "http.response.body" and not message.get("more_body", False)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if not answered:
                raise
