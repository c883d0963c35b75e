"""HTTP clients for the configured Orthanc peers, and peer detection (spec 2.1-2.5, 10, 12.1-12.2).

One `PeerClient` per `OrthancPeers` entry wraps one pooled `httpx.AsyncClient` that applies the
entry's options the way Orthanc's HTTP client does (spec 2.2): Basic auth sent preemptively when
both username and password are non-empty, the entry's `HttpHeaders` on every request, its client
certificate, `HttpsVerifyPeers` / `HttpsCACertificates` / `HttpProxy`, and the peer `Timeout`
(else `HttpTimeout`) as both connect timeout and total timeout of an attempt, the body included
(a streamed body too: a peer trickling it is cut at the deadline). We ask for
`Accept-Encoding: identity`, so the answers arrive as the peer wrote them (spec 2.5: transfer
payloads are compressed by the application, never by HTTP).

A peer is another host, trusted with nothing. Redirects are not followed (the plugin does not
either): following one would carry the peer's credentials and `HttpHeaders` to whatever host it
names, so a 3xx is a failure that says where it pointed. An answer read whole is bounded
(`max_body`, 64 MiB by default): a peer decides what it sends, we decide how much we hold.

`PeerClient.request()` succeeds only when the final status is exactly 200 (spec 2.3). Unlike the
plugin (1 s between attempts), failed attempts are retried with exponential backoff and full
jitter, and only when another attempt can help: transport errors (refused, reset, timeout,
truncated answer) and statuses 5xx and 429. Any other status fails at once. When the attempts run
out the error is a `NetworkProtocol` whose details name the peer, the request and the last cause.

`Peers` is the registry built from the configuration; `Peers.detect()` answers
`GET /transfers/peers` (spec 10), probing every peer independently, so one unreachable peer does
not turn the others "disabled" as it does in the plugin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from typing import Any

import anyio
import httpcore
import httpx
import orjson
from anyio import to_thread

from accelerator import __version__, metrics
from accelerator.config import Config, Peer
from protocol.errors import NetworkProtocol, UnknownResource

__all__ = [
    "DISABLED",
    "INSTALLED",
    "BIDIRECTIONAL",
    "MAX_ANSWER",
    "SMALL_ANSWER",
    "PeerClient",
    "advertised_codecs",
    "Peers",
    "join_url",
    "json_answer",
]

log = logging.getLogger(__name__)

DISABLED, INSTALLED, BIDIRECTIONAL = "disabled", "installed", "bidirectional"

BACKOFF_BASE = 0.5  # seconds: the first retry waits up to this long
BACKOFF_CAP = 8.0  # seconds: no single wait is longer (Retry-After included)
KEEPALIVE_EXPIRY = 4.0  # seconds: below uvicorn's 5 s idle timeout; Orthanc's 1 s is caught on reuse
_BODY_SNIPPET = 200  # characters of an error answer quoted in failure details
_ERROR_BODY_LIMIT = 64 * 1024  # bytes of a non-200 answer read (the rest is dropped)
_PATH_SHOWN = 160  # a chunk GET path can hold dozens of ids: keep messages readable
MAX_ANSWER = 64 * 1024 * 1024  # bytes of an answer read whole, unless the call says otherwise
SMALL_ANSWER = 64 * 1024  # bytes: ample for a creation answer ({"ID", "Path"})
_PARSE_INLINE = 1 << 20  # bytes of JSON parsed on the event loop; larger answers in a thread
CAPABILITIES = "/transfers/capabilities"  # ours: the codecs a peer decodes (404 on the plugin)
# httpcore reads an answer 64 KiB at a time, each read a round of h11 and anyio work while
# holding the GIL; the event loop hands over up to 256 KiB per read, so take it whole (a bucket
# download costs 4x fewer rounds; memory per connection stays 256 KiB).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 256 * 1024
CODECS_TTL = 60.0  # seconds a peer's advertised codecs are trusted (a restart may change them)
_MAX_CODECS = 16

# Errors worth another attempt: the request may not have reached the peer, or its answer was lost
# or mangled on the way. TLS verification failures are ConnectErrors too; retrying them only costs
# a few round trips before the same error is reported.
_RETRYABLE_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
    TimeoutError,  # our total-time limit of one attempt (anyio.fail_after)
)

TransportFactory = Callable[[Peer], httpx.AsyncBaseTransport]


def join_url(base: str, path: str) -> str:
    """Peer base URL (ends with '/') + absolute path, without producing '//' at the joint."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def json_answer(response: httpx.Response, *, what: str = "the answer") -> Any:
    """The JSON body of a peer answer, or NetworkProtocol (spec 2.3: such answers must be JSON)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        request = response.request
        snippet = _snippet(response.content)
        raise NetworkProtocol(
            f"{request.method} {request.url}: {what} is not valid JSON ({exc}): "
            f"{snippet or '(empty body)'}"
        ) from None


def advertised_codecs(answer: Any) -> tuple[str, ...]:
    """The "Codecs" an answer of ours carries (capabilities, lookup); () for anything else,
    e.g. the plugin's lookup answer, which has no such key."""
    codecs = answer.get("Codecs") if isinstance(answer, dict) else None
    if not isinstance(codecs, list):
        return ()
    return tuple(c for c in codecs[:_MAX_CODECS] if isinstance(c, str) and len(c) <= 32)


def _snippet(body: bytes) -> str:
    text = body[: _BODY_SNIPPET * 4].decode("utf-8", "replace")
    text = " ".join(text.split())  # error bodies are tab-indented JSON: one line in messages
    return text[:_BODY_SNIPPET] + ("..." if len(text) > _BODY_SNIPPET else "")


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _redirect(response: httpx.Response) -> str:
    """A 3xx in plain words, with the absolute target (the peer may give a relative one)."""
    location = response.headers.get("location", "")
    try:
        target = str(response.request.url.join(location)) if location else "(no Location)"
    except httpx.InvalidURL:
        target = location
    shown = _snippet(target.encode())
    return f"HTTP {response.status_code}: peer answered a redirect to {shown}; redirects are not followed"


def _describe_error(exc: BaseException, timeout: float | None) -> str:
    """A transport failure in plain words, with the exception class for the curious."""
    name = type(exc).__name__
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) or isinstance(exc, httpx.ReadTimeout):
        limit = f" within {_seconds(timeout)}" if timeout else ""
        return f"no complete answer{limit} ({name})"
    if isinstance(exc, httpx.ConnectTimeout):
        limit = f" within {_seconds(timeout)}" if timeout else ""
        return f"could not connect{limit} (ConnectTimeout)"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({name}{': ' + text if text else ''})"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect: {text or name} ({name})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the connection broke: {text or name} ({name})"
    if isinstance(exc, httpx.NetworkError):
        return f"network error: {text or name} ({name})"
    return f"{name}: {text}" if text else name


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    return None  # HTTP-date form: ignored, our own backoff applies


class _Failure(Exception):
    """One failed attempt (internal): what went wrong, whether retrying may help, a wait hint."""

    def __init__(self, cause: str, retryable: bool, wait_hint: float | None = None):
        super().__init__(cause)
        self.cause, self.retryable, self.wait_hint = cause, retryable, wait_hint


def _ssl_context(peer: Peer, config: Config) -> ssl.SSLContext:
    if config.https_verify_peers:
        ca = config.https_ca_certificates
        if ca:  # like libcurl's CAINFO: the given bundle replaces the default trust store
            context = ssl.create_default_context(
                cafile=None if _is_dir(ca) else ca, capath=ca if _is_dir(ca) else None
            )
        else:
            context = ssl.create_default_context()
            with contextlib.suppress(ImportError, OSError):
                import certifi  # httpx's dependency: a trust store even without system CAs

                context.load_verify_locations(cafile=certifi.where())
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if peer.certificate_file:
        context.load_cert_chain(
            peer.certificate_file,
            peer.certificate_key_file or None,
            peer.certificate_key_password or None,
        )
    return context


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


class PeerClient:
    """The HTTP client of one peer. Create through `Peers`; safe to share between tasks."""

    def __init__(
        self,
        peer: Peer,
        config: Config,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        transport: httpx.AsyncBaseTransport | None = None,
        shared_ssl: Callable[[], ssl.SSLContext] | None = None,
    ):
        self.peer = peer
        self._shared_ssl = shared_ssl
        self.config = config
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._codecs: tuple[str, ...] = ()
        self._codecs_until = float("-inf")

    # -- properties --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.peer.name

    @property
    def url(self) -> str:
        """The peer base URL as configured (always ends with '/')."""
        return self.peer.url

    @property
    def default_timeout(self) -> float | None:
        """Peer `Timeout`, else `HttpTimeout`; None when that is 0 (no limit, as in Orthanc)."""
        value = self.peer.effective_timeout(self.config.http_timeout)
        return float(value) if value > 0 else None

    @property
    def default_retries(self) -> int:
        return self.config.transfers.max_http_retries

    @property
    def pool_size(self) -> int:
        threads = self.config.transfers.threads
        return max(2 * threads, threads * self.config.concurrent_jobs)

    def url_for(self, path: str) -> str:
        return join_url(self.peer.url, path)

    def __repr__(self) -> str:
        return f"PeerClient({self.peer.name!r}, {self.peer.url!r})"

    # -- the httpx client --------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._closed:
            raise NetworkProtocol(f"{self._who()}: the client is closed (daemon shutting down)")
        if self._client is None:
            self._client = self._build()
        return self._client

    def _build(self) -> httpx.AsyncClient:
        peer = self.peer
        headers = {"Accept-Encoding": "identity", "User-Agent": f"accelerator/{__version__}"}
        headers.update(peer.http_headers)
        auth = httpx.BasicAuth(*peer.basic_auth) if peer.basic_auth else None
        size = self.pool_size
        options: dict[str, Any] = dict(
            auth=auth,
            headers=headers,
            timeout=httpx.Timeout(self.default_timeout),
            follow_redirects=False,  # never carry the peer's credentials and headers elsewhere
            http1=True,
            http2=False,
            trust_env=False,  # only HttpProxy applies: no surprise from *_PROXY variables
        )
        if self._transport is not None:
            return httpx.AsyncClient(transport=self._transport, **options)
        if peer.pkcs11:
            log.warning("peer %r: Pkcs11 is not supported, the option is ignored", peer.name)
        try:
            if self._shared_ssl is not None and not peer.certificate_file:
                verify = self._shared_ssl()
            else:
                verify = _ssl_context(peer, self.config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise NetworkProtocol(
                f"{self._who()}: cannot set up TLS (CertificateFile {peer.certificate_file!r}, "
                f"HttpsCACertificates {self.config.https_ca_certificates!r}): {exc}"
            ) from None
        return httpx.AsyncClient(
            verify=verify,
            proxy=self.config.http_proxy or None,
            limits=httpx.Limits(
                max_connections=size,
                max_keepalive_connections=size,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            **options,
        )

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- what the peer can decode (ours only; the plugin has no such route) --------------------

    async def codecs(self) -> tuple[str, ...]:
        """The codecs the peer advertises at `GET /transfers/capabilities`; () for a real plugin
        (404) and when the peer cannot say, which means plain gzip. One attempt, bounded by
        `PeerConnectivityTimeout`, remembered for CODECS_TTL seconds."""
        now = anyio.current_time()
        if now < self._codecs_until:
            return self._codecs
        timeout = float(self.config.transfers.peer_connectivity_timeout)
        try:
            response = await self.request("GET", CAPABILITIES, timeout=timeout, retries=0, what="capabilities",
                                          max_body=SMALL_ANSWER, accept_statuses=_NOT_200)
            answer = json_answer(response) if response.status_code == 200 else None
        except NetworkProtocol:
            answer = None
        self._codecs, self._codecs_until = advertised_codecs(answer), now + CODECS_TTL
        return self._codecs

    # -- requests ----------------------------------------------------------------------------

    def _who(self) -> str:
        return f"peer {self.peer.name!r} ({self.peer.url})"

    def _what(self, method: str, path: str, what: str | None) -> str:
        shown = path if len(path) <= _PATH_SHOWN else path[: _PATH_SHOWN - 3] + "..."
        request = f"{method} {shown}"
        return f"{what} ({request})" if what and what != request else request

    def backoff(self, attempt: int, hint: float | None = None) -> float:
        """Wait before retry number `attempt` (1-based): full jitter, capped; honours Retry-After."""
        wait = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
        if hint is not None:
            wait = max(wait, min(hint, self.backoff_cap))
        return wait

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        what: str | None = None,
        accept_statuses: Collection[int] = (),
        expect_json: bool = False,
        max_body: int = MAX_ANSWER,
    ) -> httpx.Response:
        """One call to the peer, retried as needed; the answer is read fully.

        Returns the 200 answer, or an answer whose status is in `accept_statuses` (returned at
        once, never retried). `timeout` (seconds) overrides the peer's for each attempt, both to
        connect and in total; `retries` overrides `Transfers.MaxHttpRetries` (extra attempts).
        With `expect_json`, a 200 answer that is not JSON counts as a failed attempt (spec 2.3)
        and `response.json()` is then safe. An answer of more than `max_body` bytes fails at
        once, read no further (another attempt would get the same). Raises NetworkProtocol once
        the attempts run out.
        """
        return await self._attempts(
            method, path, content=content, json=json, headers=headers, timeout=timeout,
            retries=retries, what=what, accept_statuses=accept_statuses, body_limit=max_body,
            expect_json=expect_json,
        )

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """`request()` whose 200 answer must be JSON (else retried, then NetworkProtocol)."""
        response = await self.request(method, path, expect_json=True, **kwargs)
        return json_answer(response)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        what: str | None = None,
        accept_statuses: Collection[int] = (),
    ) -> AsyncIterator[httpx.Response]:
        """Like `request()`, but yields the answer with its body not yet read.

        Retries cover everything up to the answer headers; the caller reads the body with
        `response.aiter_raw()` / `aiter_bytes()` and must be ready for httpx transport errors
        while doing so, `httpx.ReadTimeout` included: the body must have arrived by the end of
        the attempt's total time, like a body read whole. The answer is closed on exit.
        """
        response = await self._attempts(
            method, path, content=content, json=json, headers=headers, timeout=timeout,
            retries=retries, what=what, accept_statuses=accept_statuses, body_limit=None,
            expect_json=False,
        )
        try:
            yield response
        finally:
            await _close_quietly(response)

    async def _attempts(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None,
        json: Any,
        headers: Mapping[str, str] | None,
        timeout: float | None,
        retries: int | None,
        what: str | None,
        accept_statuses: Collection[int],
        body_limit: int | None,
        expect_json: bool,
    ) -> httpx.Response:
        """The attempts of one call; `body_limit` None leaves the body to the caller (streamed)."""
        limit = self.default_timeout if timeout is None else (timeout if timeout > 0 else None)
        extra = self.default_retries if retries is None else max(0, retries)
        url = self.url_for(path)
        client = self._http()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(
                    client, method, url, content, json, headers, limit, body_limit,
                    accept_statuses, expect_json,
                )
            except _Failure as failure:
                if not failure.retryable or attempt > extra:
                    count = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                    raise NetworkProtocol(
                        f"{self._who()}: {self._what(method, path, what)} failed after {count}: "
                        f"{failure.cause}"
                    ) from None
                wait = self.backoff(attempt, failure.wait_hint)
                metrics.retried(self.peer.name)
                log.warning(
                    "%s: %s failed (attempt %d of %d): %s; retrying in %.2f s",
                    self._who(), self._what(method, path, what), attempt, extra + 1,
                    failure.cause, wait,
                )
                await anyio.sleep(wait)

    async def _once(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        content: bytes | None,
        json: Any,
        headers: Mapping[str, str] | None,
        limit: float | None,
        body_limit: int | None,
        accept_statuses: Collection[int],
        expect_json: bool,
    ) -> httpx.Response:
        """One attempt, bounded by `limit` seconds in total, body included (a streamed body is
        cut at the same deadline while the caller reads it)."""
        request = client.build_request(
            method, url, content=content, json=json, headers=headers, timeout=httpx.Timeout(limit)
        )
        start = anyio.current_time()
        response: httpx.Response | None = None
        body = b""
        try:
            with anyio.fail_after(limit):
                response = await client.send(request, stream=True)
                status = response.status_code
                if status == 200 or status in accept_statuses:
                    if body_limit is not None:
                        await _read_bounded(response, body_limit)
                    elif limit is not None:
                        response.stream = _Deadline(response.stream, start + limit, limit)
                else:
                    body = await _read_prefix(response, _ERROR_BODY_LIMIT)
        except _RETRYABLE_ERRORS as exc:
            if response is not None:
                await _close_quietly(response)
            raise _Failure(_describe_error(exc, limit), retryable=True) from None
        except httpx.HTTPError as exc:  # bad URL, unsupported scheme, ...
            if response is not None:
                await _close_quietly(response)
            raise _Failure(_describe_error(exc, limit), retryable=False) from None
        except BaseException:
            if response is not None:
                await _close_quietly(response)
            raise

        if status in accept_statuses:
            return response
        if status != 200:
            raise _status_failure(response, body)
        if expect_json:
            await _check_json(response)
        return response


def _status_failure(response: httpx.Response, body: bytes) -> _Failure:
    """A non-200 answer (already closed): retryable when another attempt may get a 200."""
    status = response.status_code
    if 300 <= status < 400:
        return _Failure(_redirect(response), retryable=False)
    cause = f"HTTP {status}"
    if response.reason_phrase:
        cause += f" {response.reason_phrase}"
    snippet = _snippet(body)
    cause += f": {snippet}" if snippet else " (empty body)"
    retryable = status >= 500 or status == 429
    return _Failure(cause, retryable, _retry_after(response) if retryable else None)


async def _check_json(response: httpx.Response) -> None:
    """A 200 answer that must be JSON and is not is a failed attempt (a large one is parsed in
    a thread: tens of MB of JSON would hold the event loop)."""
    body = response.content
    try:
        if len(body) > _PARSE_INLINE:
            await to_thread.run_sync(orjson.loads, body)
        else:
            orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        snippet = _snippet(body)
        raise _Failure(
            f"HTTP 200 but the answer is not JSON ({exc}): {snippet or '(empty body)'}",
            retryable=True,
        ) from None


async def _read_bounded(response: httpx.Response, limit: int) -> None:
    """Read the whole answer, unless it proves larger than `limit` bytes (decoded): the attempt
    then fails for good, having held no more than that much of it."""
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise _Failure(f"the answer declares {declared} bytes, more than the {limit} this request "
                       f"accepts", retryable=False)
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise _Failure(f"the answer is larger than the {limit} bytes this request accepts",
                           retryable=False)
        parts.append(part)
    response._content = b"".join(parts)  # what `aread()` would keep: `.content`, `.json()` work


class _Deadline(httpx.AsyncByteStream):
    """The body of a streamed answer, due by the attempt's deadline.

    httpx's read timeout is per read, so a peer sending one byte a second would hold the caller
    for ever; past the deadline the next read fails as `httpx.ReadTimeout`, the transport error
    a reader of a streamed body handles already (a pull fetches the bucket again).
    """

    def __init__(self, inner: httpx.AsyncByteStream, deadline: float, limit: float):
        self._inner, self._deadline, self._limit = inner, deadline, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        parts = self._inner.__aiter__()
        while True:
            with anyio.CancelScope(deadline=self._deadline) as scope:
                try:
                    part = await parts.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                raise httpx.ReadTimeout(f"no complete answer within {_seconds(self._limit)}")
            yield part

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _read_prefix(response: httpx.Response, limit: int) -> bytes:
    """Up to `limit` bytes of an (error) answer body, then the answer is closed."""
    parts: list[bytes] = []
    size = 0
    try:
        async for part in response.aiter_bytes():
            parts.append(part)
            size += len(part)
            if size >= limit:
                break
    except httpx.HTTPError:
        pass  # the status already says it failed; a broken error body changes nothing
    finally:
        await response.aclose()
    return b"".join(parts)[:limit]


async def _close_quietly(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await response.aclose()


class Peers:
    """The `OrthancPeers` of the configuration, each with its lazily created `PeerClient`.

    `transport_factory` (tests) gives each peer its own httpx transport, e.g. an ASGI app.
    """

    def __init__(
        self,
        config: Config,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        transport_factory: TransportFactory | None = None,
    ):
        self.config = config
        self._ssl: ssl.SSLContext | None = None
        self._clients = {
            name: PeerClient(
                peer, config, backoff_base=backoff_base, backoff_cap=backoff_cap,
                transport=transport_factory(peer) if transport_factory else None,
                shared_ssl=self._shared_ssl,
            )
            for name, peer in config.orthanc_peers.items()
        }

    def _shared_ssl(self) -> ssl.SSLContext:
        """One TLS context for the peers without a client certificate (loading CAs is slow)."""
        if self._ssl is None:
            self._ssl = _ssl_context(Peer(name="", url="https://-/"), self.config)
        return self._ssl

    def get(self, name: str) -> PeerClient:
        try:
            return self._clients[name]
        except KeyError:
            raise UnknownResource(f"Unknown peer: {name}") from None

    def names(self) -> list[str]:
        return list(self._clients)

    def __contains__(self, name: object) -> bool:
        return name in self._clients

    def __iter__(self) -> Iterator[PeerClient]:
        return iter(self._clients.values())

    def __len__(self) -> int:
        return len(self._clients)

    async def aclose(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    async def __aenter__(self) -> "Peers":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def probe(self, name: str) -> str:
        """Detection of one peer (spec 10): `GET <base>/plugins`, one attempt."""
        client = self.get(name)
        timeout = float(self.config.transfers.peer_connectivity_timeout)
        try:
            response = await client.request("GET", "/plugins", timeout=timeout, retries=0,
                                            what="detection", max_body=SMALL_ANSWER)
            plugins = json_answer(response)
        except NetworkProtocol as exc:
            log.info("%s", exc.details)
            return DISABLED
        if not isinstance(plugins, list) or "transfers" not in plugins:
            log.info("%s: GET /plugins answered no 'transfers' plugin", client._who())
            return DISABLED
        return BIDIRECTIONAL if client.peer.remote_self is not None else INSTALLED

    async def detect(self) -> dict[str, str]:
        """Every configured peer -> "disabled" | "installed" | "bidirectional", probed concurrently
        and independently (each bounded by `PeerConnectivityTimeout`)."""
        results = {name: DISABLED for name in self._clients}

        async def run(name: str) -> None:
            try:
                results[name] = await self.probe(name)
            except Exception:  # never let one probe decide for the others
                log.exception("detection of peer %r crashed", name)

        async with anyio.create_task_group() as group:
            for name in self._clients:
                group.start_soon(run, name)
        return results


# -- what the CLI asks about peers (new module-level functions; routes: see each docstring) --------

_NOT_200 = frozenset(range(300, 600))
_JOB_ID = frozenset("0123456789abcdefABCDEF-")
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


def _cause(exc: NetworkProtocol) -> str:
    """The last cause of a failed call, without the "peer ... failed after N attempts:" prefix."""
    details = exc.details or str(exc)
    marker = " attempt: " if " attempt: " in details else " attempts: "
    return details.split(marker, 1)[1] if marker in details else details


async def probe_with_reason(peers: Peers, name: str) -> tuple[str, str]:
    """`Peers.probe` with the reason of a "disabled": (state, reason), the reason empty when the
    peer runs the transfers plugin. One attempt, bounded by `PeerConnectivityTimeout`.

    Reasons: "unreachable: ..." (refused, timed out, TLS...), "credentials refused (HTTP 401)",
    "redirected ...", "GET /plugins answered HTTP n", "GET /plugins did not answer JSON",
    "no transfers plugin (plugins: ...)". For the route `GET /transfers/remote`.
    """
    client = peers.get(name)
    timeout = float(peers.config.transfers.peer_connectivity_timeout)
    try:
        response = await client.request("GET", "/plugins", timeout=timeout, retries=0, what="detection",
                                        max_body=SMALL_ANSWER, accept_statuses=_NOT_200)
    except NetworkProtocol as exc:
        return DISABLED, f"unreachable: {_cause(exc)}"
    status = response.status_code
    if status in (401, 403):
        return DISABLED, (f"credentials refused (HTTP {status}): check Username and Password of "
                          f"peer {name!r} in OrthancPeers")
    if 300 <= status < 400:
        return DISABLED, _redirect(response)
    if status != 200:
        return DISABLED, f"GET /plugins answered HTTP {status} {response.reason_phrase}".rstrip()
    try:
        plugins = json_answer(response)
    except NetworkProtocol:
        return DISABLED, f"GET /plugins did not answer JSON: {_snippet(response.content) or '(empty body)'}"
    if not isinstance(plugins, list) or "transfers" not in plugins:
        shown = ", ".join(map(str, plugins)) if isinstance(plugins, list) else _snippet(response.content)
        return DISABLED, f"no transfers plugin (plugins: {shown or 'none'})"
    return (BIDIRECTIONAL if client.peer.remote_self is not None else INSTALLED), ""


async def detect_with_reasons(peers: Peers) -> dict[str, dict[str, str]]:
    """Every peer -> {"State": ..., "Reason": ...}, probed concurrently. `GET /transfers/peers`
    stays the plugin's {name: state}; this is the answer of `GET /transfers/remote`."""
    results = {name: {"State": DISABLED, "Reason": "not probed"} for name in peers.names()}

    async def run(name: str) -> None:
        try:
            state, reason = await probe_with_reason(peers, name)
            results[name] = {"State": state, "Reason": reason}
        except Exception as exc:  # never let one probe decide for the others
            log.exception("detection of peer %r crashed", name)
            results[name] = {"State": DISABLED, "Reason": f"detection crashed: {type(exc).__name__}"}

    async with anyio.create_task_group() as group:
        for name in peers.names():
            group.start_soon(run, name)
    return results


async def remote_job(peers: Peers, name: str, job_id: str) -> Any:
    """The peer's `GET /jobs/{id}`, with the peer's credentials from the configuration: how a
    client follows the job of a bidirectional send (the peer pulls from us) without holding the
    peer's secrets. For the route `GET /transfers/remote/{peer}/jobs/{id}`."""
    if not job_id or not set(job_id) <= _JOB_ID or len(job_id) > 64:
        raise UnknownResource(f"Not a job ID: {job_id[:80]!r}")
    return await peers.get(name).request_json("GET", f"/jobs/{job_id}", what="remote job",
                                              max_body=SMALL_ANSWER)


async def remote_lookup(peers: Peers, name: str, value: str) -> list[dict[str, str]]:
    """What the peer holds under `value`: its `POST /tools/lookup` answer (a DICOM identifier:
    PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID), and for an Orthanc ID the
    resource itself (`GET /{level}/{id}`, first level that has it). [] when the peer has nothing.
    For the route `POST /transfers/remote/{peer}/lookup` (body: the value, as /tools/lookup)."""
    client = peers.get(name)
    found: list[dict[str, str]] = []
    response = await client.request("POST", "/tools/lookup", content=value.encode(), what="lookup",
                                    max_body=MAX_ANSWER, accept_statuses=(404,), expect_json=True)
    answer = json_answer(response) if response.status_code == 200 else None  # 404: no such route
    if isinstance(answer, list):
        found += [a for a in answer if isinstance(a, dict) and {"ID", "Type"} <= set(a)]
    if _ORTHANC_ID.fullmatch(value):
        for level, plural in (("Patient", "patients"), ("Study", "studies"), ("Series", "series"),
                              ("Instance", "instances")):
            response = await client.request("GET", f"/{plural}/{value}", accept_statuses=(404,),
                                            what="lookup")
            if response.status_code == 200:
                found.append({"ID": value, "Path": f"/{plural}/{value}", "Type": level})
                break
    return found

