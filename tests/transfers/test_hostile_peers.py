"""Our daemon as a client of hostile or stalled peers: a pull (or a bidirectional send) against a
peer on loopback that answers what each test makes it answer, the daemon in-process with its
real peer clients and jobs engine.

- answers out of bounds: a lookup declaring an instance of 2**63-1 bytes, a 1 TiB transfer, a
  plan of 131,072 buckets, a 300 MB lookup answer, a 50 MB creation answer: the job fails at once
  with details naming the peer and the limit, nothing is read whole, and the event loop keeps
  answering (GET /system) meanwhile;
- a stalled peer: a chunk sent at one byte per second is cut at the peer timeout, fetched
  again, and the job fails instead of staying Running for ever;
- redirects: never followed, so another host never sees the peer's credentials or headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from accelerator.api.app import create_app, open_store
from accelerator.peers import Peers
from tests.conftest import asgi_client
from tests.faultproxy import serve_app

pytestmark = pytest.mark.anyio

ORIGINATOR = "5f3a86ea-6e2d-4b5b-9f60-2b0cda6b1c83"
STUDY = [{"Level": "Study", "ID": "0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"}]
SECRET = {"Username": "alice", "Password": "orthanctest", "HttpHeaders": {"X-Api-Key": "secret-key"}}
Handler = Callable[[Request], Response]


def instance(n: int, size: int) -> dict[str, str]:
    return {"ID": f"{n:08x}-00000000-00000000-00000000-00000000", "MD5": "0" * 32, "Size": str(size)}


def lookup_answer(*instances: dict[str, str]) -> Handler:
    return lambda request: JSONResponse({"Instances": list(instances), "Originator": ORIGINATOR})


class Server:
    """A server on loopback answering what a test sets in `answers` (path prefix -> handler),
    404 otherwise; it records every request and the bytes of streamed answers it gave out."""

    def __init__(self) -> None:
        self.answers: dict[str, Handler] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent = 0

    def reset(self) -> None:
        self.answers, self.requests, self.sent = {}, [], 0

    def paths(self, prefix: str = "/") -> list[str]:
        return [path for _, path, _ in self.requests if path.startswith(prefix)]

    def app(self) -> Starlette:
        async def answer(request: Request) -> Response:
            self.requests.append((request.method, request.url.path, dict(request.headers)))
            for prefix, handler in self.answers.items():
                if request.url.path.startswith(prefix):
                    return handler(request)
            return Response(b"not here", status_code=404)

        return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST", "PUT", "DELETE"])])

    def streamed(self, request: Request, head: bytes, block: bytes, count: int, tail: bytes = b"",
                 pause: float = 0.0) -> StreamingResponse:
        """`head`, `count` times `block` (while the client listens), `tail`; chunked."""
        async def body():
            yield head
            for _ in range(count):
                if await request.is_disconnected():
                    return
                self.sent += len(block)
                yield block
                await asyncio.sleep(pause)
            yield tail

        return StreamingResponse(body(), media_type="application/json")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    """The hostile peer, and another host its redirects point to."""
    peer, elsewhere = Server(), Server()
    with serve_app(peer.app()) as peer_url, serve_app(elsewhere.app()) as elsewhere_url:
        peer.url, elsewhere.url = peer_url, elsewhere_url
        yield peer, elsewhere


@pytest.fixture
def hostile(servers) -> Server:
    for server in servers:
        server.reset()
    return servers[0]


@pytest.fixture
def elsewhere(servers) -> Server:
    return servers[1]


@pytest.fixture
def daemon(make_config, hostile):
    """daemon(**options) -> an in-process daemon knowing the hostile server as peer `evil` (with
    credentials and an API key header) and `evil-bidir` (RemoteSelf: a bidirectional send)."""
    @contextlib.asynccontextmanager
    async def start(**options) -> AsyncIterator[httpx.AsyncClient]:
        entry = dict(SECRET, Url=hostile.url)
        transfers = {"MaxHttpRetries": 0, **options.pop("Transfers", {})}
        config = make_config({"OrthancPeers": {"evil": entry, "evil-bidir": dict(entry, RemoteSelf="me")},
                              "Transfers": transfers, **options})
        store = open_store(config)
        app = create_app(config, store, peers_=Peers(config, backoff_base=0.01, backoff_cap=0.05))
        try:
            async with app.state.jobs.running(), asgi_client(app) as client:
                yield client
        finally:
            await app.state.peers.aclose()
            store.close()
    return start


async def pull(client: httpx.AsyncClient, within: float) -> dict:
    """Pull the study from `evil`; the job once finished (which must take less than `within` s)."""
    created = await client.post("/transfers/pull", json={"Resources": STUDY, "Peer": "evil", "Compression": "none"})
    assert created.status_code == 200, created.text
    with anyio.fail_after(within):
        while (job := (await client.get(created.json()["Path"])).json())["State"] not in ("Success", "Failure"):
            await anyio.sleep(0.02)
    return job


@contextlib.asynccontextmanager
async def stalls(client: httpx.AsyncClient) -> AsyncIterator[list[float]]:
    """GET /system every 5 ms while the block runs; yields [the longest time between two
    answers], which is how long the event loop stalled at worst."""
    worst = [0.0]

    async def beat() -> None:
        last = time.monotonic()
        for _ in range(20_000):  # 100 s at most; cancelled when the block ends
            assert (await client.get("/system")).status_code == 200
            await anyio.sleep(0.005)
            now = time.monotonic()
            worst[0], last = max(worst[0], now - last), now

    async with anyio.create_task_group() as group:
        group.start_soon(beat)
        yield worst
        group.cancel_scope.cancel()


# -- item 3: answers out of bounds ------------------------------------------------------------

async def test_a_lookup_declaring_an_instance_of_2_63_bytes_fails_the_job_at_once(daemon, hostile):
    """It used to be planned on the event loop until the daemon ran out of memory."""
    hostile.answers["/transfers/lookup"] = lookup_answer(instance(1, 2**63 - 1))
    async with daemon() as client, stalls(client) as worst:
        job = await pull(client, within=5)
    assert job["State"] == "Failure"
    assert job["ErrorDetails"] == (
        f"cannot pull from peer 'evil': the lookup answer declares instance {instance(1, 0)['ID']} of "
        f"{2**63 - 1} bytes, more than Transfers.MaxInstanceSize (16384 MiB)")
    assert hostile.paths("/transfers/chunks") == [] and worst[0] < 0.25


async def test_a_1_tib_pull_that_cannot_fit_fails_before_any_bucket(daemon, hostile, tmp_path):
    """64 instances of 16 GiB, within the default limits: 131,072 buckets it used to plan on the
    event loop, then fetch until the disk was full. It now fails at once, naming the disk."""
    if shutil.disk_usage(tmp_path).free > 2**40:
        pytest.skip("this disk has room for 1 TiB")
    hostile.answers["/transfers/lookup"] = lookup_answer(*(instance(n, 16 << 30) for n in range(64)))
    async with daemon() as client, stalls(client) as worst:
        job = await pull(client, within=5)
    assert job["State"] == "Failure"
    assert job["ErrorDetails"].startswith(f"cannot pull from peer 'evil': The transfer needs {2**40} bytes; "
                                          "the disk of the storage area has ")
    assert hostile.paths("/transfers/chunks") == [] and worst[0] < 0.25


async def test_a_plan_of_131072_buckets_is_made_off_the_event_loop(daemon, hostile):
    """The bucket count of a 1 TiB pull, with a disk that has room: 256 MiB at BucketSize 1 KiB.
    Planning, saving and loading the plan take about a second; GET /system answers meanwhile."""
    hostile.answers["/transfers/lookup"] = lookup_answer(instance(1, 256 << 20))
    async with daemon(Transfers={"BucketSize": 1, "Threads": 2}) as client, stalls(client) as worst:
        job = await pull(client, within=30)
    assert job["State"] == "Failure"  # the peer has no chunks: 404 for the first bucket
    assert "GET bucket" in job["ErrorDetails"] and "HTTP 404" in job["ErrorDetails"]
    assert job["Content"]["TotalSizeMB"] == 256 and 1 <= len(hostile.paths("/transfers/chunks")) <= 2
    assert worst[0] < 0.25, f"the event loop stalled for {worst[0]:.2f} s"


async def test_a_plan_beyond_a_million_buckets_is_refused_unplanned(daemon, hostile):
    """16 GiB at BucketSize 1 KiB would be 8 million buckets: refused before planning."""
    hostile.answers["/transfers/lookup"] = lookup_answer(instance(1, 16 << 30))
    async with daemon(Transfers={"BucketSize": 1}) as client, stalls(client) as worst:
        job = await pull(client, within=5)
    assert job["State"] == "Failure"
    assert job["ErrorDetails"] == (
        "cannot pull from peer 'evil': the plan at a bucket size of 1024 bytes (Transfers.BucketSize) has "
        f"{(16 << 30) // 2048} chunks, more than 1000000")
    assert worst[0] < 0.25


async def test_a_300_mb_lookup_answer_is_not_read_whole(daemon, hostile):
    """At MaxTransferInstances 100 a lookup answer is read up to 116,736 bytes; the peer streams
    300 MB of instances and gets to hand over only what the socket buffers take."""
    entry = b'{"ID": "00000001-00000000-00000000-00000000-00000000", "MD5": "' + b"0" * 32 + b'", "Size": "1"},'
    hostile.answers["/transfers/lookup"] = lambda request: (hostile.streamed(
        request, b'{"Originator": "' + ORIGINATOR.encode() + b'", "Instances": [',
        entry * (65536 // len(entry)), 300_000_000 // 65536, entry[:-1] + b"]}"))
    async with daemon(Transfers={"MaxTransferInstances": 100}) as client, stalls(client) as worst:
        job = await pull(client, within=10)
    assert job["State"] == "Failure"
    assert job["ErrorDetails"] == (
        f"peer 'evil' ({hostile.url}/): lookup (POST /transfers/lookup) failed after 1 attempt: the answer is "
        "larger than the 116736 bytes this request accepts")
    assert hostile.sent < 32 << 20 and worst[0] < 0.25


async def test_a_lookup_over_the_instance_limit_fails_naming_the_option(daemon, hostile):
    hostile.answers["/transfers/lookup"] = lookup_answer(*(instance(n, 10) for n in range(101)))
    async with daemon(Transfers={"MaxTransferInstances": 100}) as client:
        job = await pull(client, within=5)
    assert job["ErrorDetails"] == ("cannot pull from peer 'evil': the lookup answer declares 101 instances, "
                                   "more than Transfers.MaxTransferInstances (100)")


async def test_a_lookup_with_a_20_mb_field_fails_in_a_few_words(daemon, hostile):
    """Within the bound (25 MB at the default MaxTransferInstances), a malformed answer is quoted
    in the job's details: a few hundred characters of it."""
    hostile.answers["/transfers/lookup"] = lookup_answer(dict(instance(1, 10), MD5="f" * 20_000_000))
    async with daemon() as client:
        job = await pull(client, within=10)
    assert job["State"] == "Failure" and len(job["ErrorDetails"]) < 500
    assert job["ErrorDetails"].startswith("peer 'evil' answered a malformed lookup: MD5 is not 32 lowercase hex")


async def test_a_50_mb_answer_to_a_bidirectional_send_is_not_echoed(daemon, hostile):
    """Refused as a malformed creation answer (or, with `max_body` on that request, unread)."""
    hostile.answers["/transfers/pull"] = lambda request: (
        JSONResponse({"ID": "j" * 50_000_000, "Path": "/jobs/j"}))
    async with daemon() as client:
        answer = await client.post("/transfers/send", json={"Resources": STUDY, "Peer": "evil-bidir",
                                                            "Compression": "gzip"})
    assert answer.status_code == 500 and len(answer.content) < 2000
    assert "peer 'evil-bidir'" in answer.json()["Details"] and "j" * 100 not in answer.json()["Details"]


# -- item 4: stalled peers ---------------------------------------------------------------------

async def test_a_chunk_sent_at_one_byte_per_second_fails_the_job(daemon, hostile):
    """Every read comes within the 2 s HttpTimeout, but HttpTimeout covers the whole body: each
    attempt is cut after 2 s, the bucket fetched again (MaxHttpRetries 1), then the job fails
    instead of staying Running for ever."""
    hostile.answers["/transfers/lookup"] = lookup_answer(instance(1, 1000))
    hostile.answers["/transfers/chunks/"] = lambda request: (
        hostile.streamed(request, b"", b"x", 1000, pause=1.0))
    async with daemon(HttpTimeout=2, Transfers={"MaxHttpRetries": 1}) as client:
        start = time.monotonic()
        job = await pull(client, within=12)
        elapsed = time.monotonic() - start
    assert job["State"] == "Failure" and 3.9 < elapsed < 8
    assert job["ErrorDetails"] == (
        f"peer 'evil': GET bucket 0 (/transfers/chunks/{instance(1, 0)['ID']}) failed after 2 attempts: "
        "the answer is corrupt, cut short or late: ReadTimeout: no complete answer within 2 s")
    assert len(hostile.paths("/transfers/chunks/")) == 2


# -- item 9: redirects -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["/transfers/lookup", "/transfers/chunks/"])
async def test_a_redirect_is_not_followed_and_the_peer_secrets_stay_with_the_peer(daemon, hostile, elsewhere, where):
    target = f"{elsewhere.url}/steal"
    hostile.answers["/transfers/lookup"] = lookup_answer(instance(1, 1000))
    hostile.answers[where] = lambda request: (RedirectResponse(target, status_code=302))
    async with daemon() as client:
        job = await pull(client, within=10)
    assert job["State"] == "Failure"
    assert f"failed after 1 attempt: HTTP 302: peer answered a redirect to {target}; redirects are not followed" \
        in job["ErrorDetails"]
    assert elsewhere.requests == []  # never contacted: neither the API key nor the password went there
    assert hostile.requests[0][2]["x-api-key"] == "secret-key"
