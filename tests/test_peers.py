"""Peer HTTP clients and peer detection, against real servers on loopback and the fault proxy."""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from accelerator.api import peers as peers_api
from accelerator.api.http import handle_http_exception, handle_orthanc_error
from accelerator.peers import PeerClient, Peers, join_url, json_answer
from protocol.errors import NetworkProtocol, OrthancError, UnknownResource
from tests.conftest import asgi_client
from tests.faultproxy import Fault, FaultProxy, serve_app

pytestmark = pytest.mark.anyio

BIG = bytes(range(256)) * 4096  # 1 MiB
FAST = dict(backoff_base=0.01, backoff_cap=0.05)  # retries without the real-life pauses


class Upstream:
    """A small Orthanc look-alike that records what reaches it.

    `/plugins` lists "transfers"; under a prefix it plays other servers: `/plain/plugins`
    (no transfers plugin), `/object/plugins` (not an array), `/auth/plugins` (401 without the
    right credentials)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.flooded = 0  # bytes of /flood handed to the server so far
        self._lock = threading.Lock()

    def seen(self, path: str) -> list[dict[str, str]]:
        with self._lock:
            return [headers for _, p, headers in self.requests if p == path]

    def app(self) -> Starlette:
        async def record(request: Request) -> None:
            with self._lock:
                self.requests.append((request.method, request.url.path, dict(request.headers)))

        async def plugins(request: Request) -> Response:
            await record(request)
            variant = request.path_params.get("variant", "")
            if variant == "plain":
                return JSONResponse(["explorer.js"])
            if variant == "object":
                return JSONResponse({"transfers": True})
            if variant == "auth":
                expected = "Basic " + base64.b64encode(b"alice:orthanctest").decode()
                if request.headers.get("authorization") != expected:
                    return Response(b"", status_code=401, headers={"WWW-Authenticate": 'Basic realm="Orthanc"'})
            return JSONResponse(["explorer.js", "transfers"])

        async def lookup(request: Request) -> Response:
            await record(request)
            return JSONResponse({"echo": await request.json()})

        async def headers(request: Request) -> Response:
            await record(request)
            return JSONResponse(dict(request.headers))

        async def status(request: Request) -> Response:
            await record(request)
            code = int(request.path_params["code"])
            return Response(b'{\n\t"Details" : "nothing here"\n}\n' if code >= 400 else b"", status_code=code)

        async def text(request: Request) -> Response:
            await record(request)
            return Response(b"this is not JSON", media_type="text/plain")

        async def big(request: Request) -> Response:
            await record(request)
            return Response(BIG, media_type="application/octet-stream")

        async def trickle(request: Request) -> Response:
            await record(request)

            async def body():
                for _ in range(50):  # 5 s in all, every read well within any timeout
                    yield b"x"
                    await asyncio.sleep(0.1)

            return StreamingResponse(body(), media_type="application/octet-stream")

        async def redirect(request: Request) -> Response:
            await record(request)
            return RedirectResponse(request.query_params.get("to", "/plugins"), status_code=302)

        async def flood(request: Request) -> Response:
            """256 MiB of JSON-ish bytes, chunked (no Content-Length); counts what was sent."""
            await record(request)

            async def body():
                for _ in range(4096):
                    if await request.is_disconnected():
                        return
                    self.flooded += 65536
                    yield b" " * 65536

            return StreamingResponse(body(), media_type="application/json")

        return Starlette(routes=[
            Route("/plugins", plugins),
            Route("/{variant}/plugins", plugins),
            Route("/transfers/lookup", lookup, methods=["POST"]),
            Route("/headers", headers, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/status/{code}", status, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/text", text),
            Route("/big", big),
            Route("/trickle", trickle),
            Route("/redirect", redirect),
            Route("/flood", flood),
        ])


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    with serve_app(up.app()) as url:
        up.url = url
        yield up


@pytest.fixture(scope="module")
def elsewhere():
    """Another server on loopback: where a hostile peer's redirects point."""
    other = Upstream()
    with serve_app(other.app()) as url:
        other.url = url
        yield other


@pytest.fixture
async def peers_for(make_config):
    """peers_for({name: entry}, **options) -> Peers (closed at teardown); fast backoff."""
    made: list[Peers] = []

    def make(entries: dict, transfers: dict | None = None, backoff: dict | None = None, **options) -> Peers:
        config = make_config({"OrthancPeers": entries, "Transfers": transfers or {}, **options})
        peers = Peers(config, **(FAST if backoff is None else backoff))
        made.append(peers)
        return peers

    yield make
    for peers in made:
        await peers.aclose()


def _always(fault: Fault | None):
    return lambda method, path, attempt: fault


def _first(n: int, fault: Fault):
    return lambda method, path, attempt: fault if attempt <= n else None


# -- URLs, registry ----------------------------------------------------------------------------

def test_join_url_never_doubles_the_slash():
    assert join_url("http://h:8042/", "/transfers/peers") == "http://h:8042/transfers/peers"
    assert join_url("http://h:8042/", "transfers/peers") == "http://h:8042/transfers/peers"
    assert join_url("http://h/orthanc/", "/plugins") == "http://h/orthanc/plugins"
    assert join_url("http://h:8042/", "/transfers/chunks/a.b?offset=0&size=1&compression=none") == (
        "http://h:8042/transfers/chunks/a.b?offset=0&size=1&compression=none")


async def test_registry(peers_for):
    peers = peers_for({"b": ["http://127.0.0.1:9"], "a": {"Url": "http://127.0.0.1:9/x", "RemoteSelf": "me"}})
    async with peers:
        assert peers.names() == ["b", "a"] and len(peers) == 2 and "a" in peers
        client = peers.get("a")
        assert isinstance(client, PeerClient)
        assert client.url == "http://127.0.0.1:9/x/" and client.peer.remote_self == "me"
        assert client.url_for("/plugins") == "http://127.0.0.1:9/x/plugins"
        assert peers.get("a") is client
        with pytest.raises(UnknownResource) as info:
            peers.get("nope")
        assert info.value.http_status == 404 and info.value.details == "Unknown peer: nope"


async def test_timeouts_and_pool_from_config(peers_for):
    peers = peers_for({"b": ["http://127.0.0.1:9/"], "c": {"Url": "http://127.0.0.1:9/", "Timeout": 7}},
                      {"Threads": 6, "MaxHttpRetries": 5}, HttpTimeout=12, ConcurrentJobs=1)
    async with peers:
        assert peers.get("b").default_timeout == 12 and peers.get("c").default_timeout == 7
        assert peers.get("b").default_retries == 5
        assert peers.get("b").pool_size == 12
    unlimited = peers_for({"b": ["http://127.0.0.1:9/"]}, HttpTimeout=0)
    assert unlimited.get("b").default_timeout is None


# -- success, auth, headers --------------------------------------------------------------------

async def test_success_auth_and_headers(upstream, peers_for):
    entry = {"Url": upstream.url, "Username": "alice", "Password": "orthanctest",
             "HttpHeaders": {"X-Token": "t1", "X-Other": "o"}}
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            async with peers_for({"b": dict(entry, Url=proxy.url)}) as peers:
                peer = peers.get("b")
                response = await peer.request(
                    "POST", "/transfers/lookup", json={"Resources": []},
                    headers={"sender-transfer-id": "s-1", "Expect": ""}, what="lookup")
                assert response.status_code == 200
                assert json_answer(response) == {"echo": {"Resources": []}}
                answer = await peer.request_json("GET", "/headers")
    # The path was joined without '//', one request each: Basic auth went with the first one.
    assert proxy.counts == {("POST", "/transfers/lookup"): 1, ("GET", "/headers"): 1}
    sent = upstream.seen("/transfers/lookup")[-1]
    expected = "Basic " + base64.b64encode(b"alice:orthanctest").decode()
    for headers in (sent, answer):
        assert headers["authorization"] == expected
        assert headers["x-token"] == "t1" and headers["x-other"] == "o"
        assert headers["accept-encoding"] == "identity"
    assert sent["sender-transfer-id"] == "s-1" and sent["content-type"] == "application/json"


@pytest.mark.parametrize("credentials", [("alice", ""), ("", "secret")])
async def test_no_basic_auth_unless_both_credentials(upstream, peers_for, credentials):
    username, password = credentials
    with anyio.fail_after(10):
        async with peers_for({"b": {"Url": upstream.url, "Username": username, "Password": password}}) as peers:
            answer = await peers.get("b").request_json("GET", "/headers")
    assert "authorization" not in answer


@pytest.mark.parametrize("how", ["request", "stream"])
async def test_redirects_are_not_followed_and_credentials_stay_with_the_peer(upstream, elsewhere, peers_for, how):
    """A peer's 302 to another host: nothing reaches that host, least of all the peer's API key."""
    target = f"{elsewhere.url}/headers"
    entry = {"Url": upstream.url, "Username": "alice", "Password": "orthanctest",
             "HttpHeaders": {"X-Api-Key": "secret-key"}}
    with anyio.fail_after(10):
        async with peers_for({"b": entry}) as peers:
            peer = peers.get("b")
            with pytest.raises(NetworkProtocol) as info:
                if how == "request":
                    await peer.request("GET", f"/redirect?to={target}", what="lookup")
                else:
                    async with peer.stream("GET", f"/redirect?to={target}"):
                        pass
            with pytest.raises(NetworkProtocol) as relative:  # relative: shown as absolute
                await peer.request("GET", "/redirect")
    assert f"failed after 1 attempt: HTTP 302: peer answered a redirect to {target}; " \
           "redirects are not followed" in info.value.details
    assert f"peer answered a redirect to {upstream.url}/plugins;" in relative.value.details
    assert elsewhere.requests == []  # never contacted, so never given the headers
    assert upstream.seen("/redirect")[-1]["x-api-key"] == "secret-key"


# -- bounded answers ---------------------------------------------------------------------------

async def test_an_answer_declared_larger_than_the_bound_is_refused_unread(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                with pytest.raises(NetworkProtocol) as info:
                    await peers.get("b").request("GET", "/big", max_body=len(BIG) - 1)
                assert (await peers.get("b").request("GET", "/big", max_body=len(BIG))).content == BIG
    assert proxy.count("GET", "/big") == 2  # refused at once, not retried
    assert info.value.details.endswith(
        f"failed after 1 attempt: the answer declares {len(BIG)} bytes, more than the {len(BIG) - 1} "
        "this request accepts")


async def test_a_flood_without_length_is_cut_at_the_bound(upstream, peers_for):
    """A 256 MiB chunked answer: reading stops past the bound; the server could hand over only
    what the socket buffers hold."""
    with anyio.fail_after(10):
        async with peers_for({"b": [upstream.url]}) as peers:
            with pytest.raises(NetworkProtocol) as info:
                await peers.get("b").request_json("GET", "/flood", max_body=100_000)
            assert "failed after 1 attempt: the answer is larger than the 100000 bytes this request " \
                   "accepts" in info.value.details
            await anyio.sleep(0.3)
    assert upstream.flooded < 32 << 20


async def test_stream_variant(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _first(1, Fault.status(503))) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                async with peers.get("b").stream("GET", "/big") as response:
                    assert response.status_code == 200 and not response.is_closed
                    data = b"".join([part async for part in response.aiter_bytes()])
                assert response.is_closed
    assert data == BIG and proxy.count("GET", "/big") == 2


async def test_concurrent_requests_share_the_client(upstream, peers_for):
    with anyio.fail_after(20):
        async with peers_for({"b": [upstream.url]}, {"Threads": 2}) as peers:
            peer = peers.get("b")
            results = []

            async def fetch():
                results.append(len((await peer.request("GET", "/big")).content))

            async with anyio.create_task_group() as group:
                for _ in range(12):
                    group.start_soon(fetch)
    assert results == [len(BIG)] * 12


# -- retries -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Fault.status(503), Fault.status(500), Fault.status(429, headers={"Retry-After": "1"}),
    Fault.drop(), Fault.drop(after_upstream=True), Fault.truncate(0.3),
])
async def test_retry_then_success(upstream, peers_for, fault):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _first(2, fault)) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                response = await peers.get("b").request("GET", "/big")
    assert response.status_code == 200 and response.content == BIG
    assert proxy.count("GET", "/big") == 3


async def test_unparsable_json_is_retried_when_json_is_expected(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _first(1, Fault.status(200, b"<html>oops"))) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                answer = await peers.get("b").request_json("POST", "/transfers/lookup", json={"x": 1})
    assert answer == {"echo": {"x": 1}} and proxy.count("POST", "/transfers/lookup") == 2


@pytest.mark.parametrize("code", [404, 400, 401, 201, 204])
async def test_no_retry_on_other_statuses(upstream, peers_for, code):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                with pytest.raises(NetworkProtocol) as info:
                    await peers.get("b").request("GET", f"/status/{code}")
    assert proxy.count("GET", f"/status/{code}") == 1
    assert f"failed after 1 attempt: HTTP {code}" in info.value.details
    if code == 404:
        assert 'HTTP 404 Not Found: { "Details" : "nothing here" }' in info.value.details


async def test_accepted_statuses_are_returned(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                response = await peers.get("b").request("DELETE", "/status/404", accept_statuses=(404,))
    assert response.status_code == 404 and b"nothing here" in response.content
    assert proxy.count("DELETE", "/status/404") == 1


async def test_failure_details_after_retries_run_out(upstream, peers_for):
    fault = Fault.status(503, b'{\n\t"Message" : "Service busy, retry later"\n}\n')
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _always(fault)) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:  # MaxHttpRetries: 3 by default
                with pytest.raises(NetworkProtocol) as info:
                    await peers.get("b").request("POST", "/transfers/lookup", json={}, what="lookup")
    assert proxy.count("POST", "/transfers/lookup") == 4
    error = info.value
    assert error.http_status == 500 and error.orthanc_status == 9
    assert error.details == (
        f"peer 'b' ({proxy.url}/): lookup (POST /transfers/lookup) failed after 4 attempts: "
        'HTTP 503 Service Unavailable: { "Message" : "Service busy, retry later" }')


async def test_retries_follow_config_and_call(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _always(Fault.drop())) as proxy:
            async with peers_for({"b": [proxy.url]}, {"MaxHttpRetries": 1}) as peers:
                with pytest.raises(NetworkProtocol) as info:
                    await peers.get("b").request("GET", "/big")
                assert proxy.count("GET", "/big") == 2
                assert "failed after 2 attempts: the connection broke" in info.value.details
                with pytest.raises(NetworkProtocol):
                    await peers.get("b").request("GET", "/headers", retries=0)
                assert proxy.count("GET", "/headers") == 1


async def test_unreachable_peer_names_the_cause(peers_for):
    with anyio.fail_after(10):
        async with peers_for({"gone": ["http://127.0.0.1:9/"]}, {"MaxHttpRetries": 1}) as peers:
            with pytest.raises(NetworkProtocol) as info:
                await peers.get("gone").request("GET", "/system")
    assert info.value.details.startswith(
        "peer 'gone' (http://127.0.0.1:9/): GET /system failed after 2 attempts: could not connect")


def test_backoff_is_jittered_and_capped(make_config):
    peer = Peers(make_config({"OrthancPeers": {"b": ["http://127.0.0.1:9/"]}})).get("b")
    waits = [peer.backoff(attempt) for attempt in range(1, 12) for _ in range(20)]
    assert all(0 <= w <= 8.0 for w in waits) and max(waits) > 2.0
    assert all(peer.backoff(1) <= 0.5 for _ in range(50))
    assert peer.backoff(1, hint=3.0) == 3.0 and peer.backoff(1, hint=60) == 8.0


# -- timeouts ----------------------------------------------------------------------------------

async def test_call_timeout_is_honoured(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _always(Fault.stall(8))) as proxy:
            async with peers_for({"b": [proxy.url]}) as peers:
                start = time.monotonic()
                with pytest.raises(NetworkProtocol) as info:
                    await peers.get("b").request("GET", "/big", timeout=0.3, retries=0)
                elapsed = time.monotonic() - start
    assert 0.25 < elapsed < 1.5
    assert "failed after 1 attempt: no complete answer within 0.3 s" in info.value.details


@pytest.mark.parametrize("where", ["peer", "global"])
async def test_configured_timeout_is_honoured(upstream, peers_for, where):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url, _always(Fault.stall(8))) as proxy:
            entry = {"Url": proxy.url, "Timeout": 1} if where == "peer" else [proxy.url]
            async with peers_for({"b": entry}, {"MaxHttpRetries": 0}, HttpTimeout=1 if where == "global" else 60) as peers:
                start = time.monotonic()
                with pytest.raises(NetworkProtocol):
                    await peers.get("b").request("GET", "/big")
                assert 0.9 < time.monotonic() - start < 2.5


async def test_timeout_is_a_total_not_per_read(upstream, peers_for):
    """A peer that trickles its answer is cut at the timeout even though every read is quick."""
    with anyio.fail_after(10):
        async with peers_for({"b": [upstream.url]}) as peers:
            start = time.monotonic()
            with pytest.raises(NetworkProtocol) as info:
                await peers.get("b").request("GET", "/trickle", timeout=0.8, retries=0)
            assert time.monotonic() - start < 2.5
    assert "no complete answer within 0.8 s" in info.value.details


async def test_a_streamed_body_is_due_by_the_deadline(upstream, peers_for):
    """/trickle sends a byte every 0.1 s for 5 s: each read is quick, the whole is not."""
    with anyio.fail_after(10):
        async with peers_for({"b": [upstream.url]}) as peers:
            start = time.monotonic()
            async with peers.get("b").stream("GET", "/trickle", timeout=0.8, retries=0) as response:
                with pytest.raises(httpx.ReadTimeout, match="no complete answer within 0.8 s"):
                    async for _ in response.aiter_raw():
                        pass
            assert 0.7 < time.monotonic() - start < 2.5
            async with peers.get("b").stream("GET", "/big", timeout=5) as response:  # in time: whole
                assert b"".join([part async for part in response.aiter_raw()]) == BIG


# -- TLS and proxy -----------------------------------------------------------------------------

async def test_http_proxy_option(upstream, peers_for):
    with anyio.fail_after(10):
        async with FaultProxy(upstream.url) as proxy:
            # The peer URL is unreachable: only the HttpProxy can answer.
            async with peers_for({"b": ["http://127.0.0.1:9/"]}, HttpProxy=proxy.url) as peers:
                assert await peers.detect() == {"b": "installed"}
    assert proxy.count("GET", "/plugins") == 1


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate with a protected key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    _openssl("req", "-x509", *ec, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *ec, "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    _openssl("req", *ec, "-keyout", "client.key", "-passout", "pass:kpass", "-out", "client.csr",
             "-subj", "/CN=client", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.pem", "-days", "2", cwd=d)
    return d


@pytest.fixture(scope="module")
def tls_upstream(pki, upstream):
    tls = {"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key"),
           "ca_certs": str(pki / "ca.pem"), "cert_reqs": ssl.CERT_REQUIRED}
    with serve_app(upstream.app(), tls=tls) as url:
        yield url


async def test_tls_client_certificate_and_ca(pki, tls_upstream, peers_for):
    client_cert = {"CertificateFile": str(pki / "client.pem"), "CertificateKeyFile": str(pki / "client.key"),
                   "CertificateKeyPassword": "kpass"}
    with anyio.fail_after(15):
        async with peers_for({
            "good": {"Url": tls_upstream, **client_cert},
            "no-client-cert": {"Url": tls_upstream},
        }, HttpsCACertificates=str(pki / "ca.pem")) as peers:
            assert await peers.detect() == {"good": "installed", "no-client-cert": "disabled"}
        # Without our CA the server certificate is not trusted, unless verification is off.
        async with peers_for({"b": {"Url": tls_upstream, **client_cert}}, {"MaxHttpRetries": 0}) as peers:
            with pytest.raises(NetworkProtocol) as info:
                await peers.get("b").request("GET", "/plugins")
            assert "CERTIFICATE_VERIFY_FAILED" in info.value.details
        async with peers_for({"b": {"Url": tls_upstream, **client_cert}}, HttpsVerifyPeers=False) as peers:
            assert await peers.detect() == {"b": "installed"}


async def test_unreadable_certificate_disables_the_peer(tmp_path, peers_for):
    entry = {"Url": "https://127.0.0.1:9/", "CertificateFile": str(tmp_path / "missing.pem")}
    with anyio.fail_after(10):
        async with peers_for({"b": entry}) as peers:
            with pytest.raises(NetworkProtocol) as info:
                await peers.get("b").request("GET", "/plugins")
            assert "peer 'b'" in info.value.details and "missing.pem" in info.value.details
            assert await peers.detect() == {"b": "disabled"}


# -- detection ---------------------------------------------------------------------------------

async def test_detect_every_outcome(upstream, peers_for):
    with anyio.fail_after(15):
        async with FaultProxy(upstream.url, _always(Fault.stall(10)), max_stall=10) as stalled:
            peers = peers_for({
                # Sorted first on purpose: in the plugin this failure would disable those after it.
                "a-unreachable": ["http://127.0.0.1:9/"],
                "b": [upstream.url],
                "b-bidir": {"Url": upstream.url, "RemoteSelf": "a"},
                "b-slash": [upstream.url + "/"],
                "c-stalled": [stalled.url],
                "c-stalled-too": {"Url": stalled.url, "RemoteSelf": "a"},
                "c-stalled-3": [stalled.url],
                "c-stalled-4": [stalled.url],
                "d-401": [upstream.url + "/auth"],
                "d-auth": [upstream.url + "/auth", "alice", "orthanctest"],
                "e-plain": [upstream.url + "/plain"],
                "f-object": [upstream.url + "/object"],
                "g-404": [upstream.url + "/status/404"],
            }, {"PeerConnectivityTimeout": 1, "MaxHttpRetries": 3})
            async with peers:
                start = time.monotonic()
                result = await peers.detect()
                elapsed = time.monotonic() - start
    assert result == {
        "a-unreachable": "disabled", "b": "installed", "b-bidir": "bidirectional", "b-slash": "installed",
        "c-stalled": "disabled", "c-stalled-too": "disabled", "c-stalled-3": "disabled",
        "c-stalled-4": "disabled", "d-401": "disabled", "d-auth": "installed",
        "e-plain": "disabled", "f-object": "disabled", "g-404": "disabled",
    }
    assert list(result) == peers.names()
    # Concurrent (4 stalled peers in a row would take 4 s), one attempt each (no retries), each
    # bounded by PeerConnectivityTimeout.
    assert elapsed < 2.5
    assert stalled.count("GET", "/plugins") == 4


async def test_detect_sends_credentials_and_headers(upstream, peers_for):
    entry = {"Url": upstream.url + "/auth", "Username": "alice", "Password": "orthanctest",
             "HttpHeaders": {"X-Probe": "1"}}
    with anyio.fail_after(10):
        async with peers_for({"p": entry}) as peers:
            assert await peers.detect() == {"p": "installed"}
    headers = upstream.seen("/auth/plugins")[-1]
    assert headers["x-probe"] == "1" and headers["authorization"].startswith("Basic ")


async def test_detect_with_no_peers(peers_for):
    async with peers_for({}) as peers:
        assert await peers.detect() == {}


async def test_closed_client_refuses(upstream, peers_for):
    peers = peers_for({"b": [upstream.url]})
    await peers.get("b").request("GET", "/plugins")
    await peers.aclose()
    with pytest.raises(NetworkProtocol, match="closed"):
        await peers.get("b").request("GET", "/plugins")


# -- GET /transfers/peers ----------------------------------------------------------------------

def _app(peers: Peers) -> Starlette:
    app = Starlette(routes=peers_api.routes(), exception_handlers={
        OrthancError: handle_orthanc_error, HTTPException: handle_http_exception})
    app.state.peers = peers
    app.state.describe_errors = True
    return app


async def test_transfers_peers_route(upstream, peers_for):
    peers = peers_for({"b": [upstream.url], "b-bidir": {"Url": upstream.url, "RemoteSelf": "x"},
                       "plain": [upstream.url + "/plain"], "unreachable": ["http://127.0.0.1:9/"]})
    with anyio.fail_after(10):
        async with peers, asgi_client(_app(peers)) as http:
            response = await http.get("/transfers/peers")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {"b": "installed", "b-bidir": "bidirectional",
                                       "plain": "disabled", "unreachable": "disabled"}
            wrong = await http.post("/transfers/peers")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


# -- against the real daemon -------------------------------------------------------------------

@pytest.mark.slow
async def test_against_the_real_daemon(tmp_path, peers_for):
    from bench.harness import Daemon

    with Daemon({}, tmp_path / "daemon") as daemon:
        with anyio.fail_after(20):
            async with FaultProxy(daemon.url, _first(1, Fault.drop())) as proxy:
                peers = peers_for({"real": [daemon.url], "real-bidir": {"Url": proxy.url, "RemoteSelf": "me"}})
                async with peers:
                    assert await peers.detect() == {"real": "installed", "real-bidir": "disabled"}
                    assert await peers.detect() == {"real": "installed", "real-bidir": "bidirectional"}
                    system = await peers.get("real-bidir").request_json("GET", "/system")
                    assert system["HttpPort"] == daemon.port
