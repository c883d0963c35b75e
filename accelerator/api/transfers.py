"""The /transfers/* routes of the source and receiver roles, and the plugin-detection routes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from accelerator import __version__
from accelerator.api.core import route
from accelerator.api.http import json_answer, parse_json, read_body
from accelerator.api.replication import gateway_fetch
from accelerator.peers import SMALL_ANSWER
from accelerator.transfers import pull, push, source
from accelerator.transfers.budget import ByteBudget
from accelerator.transfers.receiver import PushReceiver
from protocol import codecs
from protocol.chunks import parse_chunk_request
from protocol.errors import BadFileFormat, BodyTooLarge, NetworkProtocol, OrthancError, ParameterOutOfRange
from protocol.messages import (
    Created,
    LookupAnswer,
    PushTransaction,
    TransferQuery,
    bucket_size,
    parse_lookup_request,
)

PLUGIN_VERSION = "1.7"  # the plugin release whose wire protocol we speak (unchanged since 1.0)
PLUGIN_DESCRIPTION = "Accelerates transfers and provides storage commitment between Orthanc peers"
JSON_LIMIT = 64 * 1024 * 1024  # lookups and push plans of huge studies stay far below this
IN_MEMORY_CHUNK_LIMIT = 64 * 1024 * 1024  # larger chunk answers are streamed
CHUNK_MEMORY = 48 * 1024 * 1024  # raw bucket bytes read for chunk answers at once (+ their gzip)
_FEED_BLOCK = 1 << 20


async def _json_body(request: Request):
    """The plugin answers Bad file format (15) for a body that is not JSON (spec 2.6)."""
    return parse_json(await read_body(request, JSON_LIMIT), error=BadFileFormat)


def _receiver(request: Request) -> PushReceiver:
    return request.app.state.receiver


# -- plugin detection --------------------------------------------------------------------------

async def get_plugins(request: Request) -> Response:
    return json_answer(["transfers"])


async def get_plugin(request: Request) -> Response:
    return json_answer({
        "AcceleratorVersion": __version__,
        "Description": PLUGIN_DESCRIPTION,
        "ExtendsOrthancExplorer": False,
        "ID": "transfers",
        "Version": PLUGIN_VERSION,
    })


# -- source role -------------------------------------------------------------------------------

def _codecs(request: Request) -> list[str]:
    """What we advertise to our peers (beyond the plugin's protocol): a puller learns it from our
    lookup answer ("Codecs", a key the plugin ignores), a pusher from GET /transfers/capabilities
    (404 on the plugin). Nothing beyond gzip when `Transfers.NegotiatedCodecs` is off."""
    if request.app.state.config.transfers.negotiated_codecs:
        return list(codecs.available())
    return [codecs.GZIP, codecs.NONE]


def _check_enabled(request: Request, compression: str) -> None:
    """A codec we do not advertise is refused as the plugin refuses it (400)."""
    if compression not in _codecs(request):
        raise ParameterOutOfRange(f'Valid compressions are "gzip" and "none", not {compression!r}')


async def get_capabilities(request: Request) -> Response:
    return json_answer({"Codecs": _codecs(request)})


async def post_lookup(request: Request) -> Response:
    resources = parse_lookup_request(await _json_body(request))
    await gateway_fetch(request, resources)  # gateway mode: from the Orthanc behind us first
    store = request.app.state.store
    instances = await to_thread.run_sync(source.lookup, store, resources)
    answer = LookupAnswer.build(instances, request.app.state.originator)
    return json_answer(dict(answer.to_json(), Codecs=_codecs(request)), compact=True)


async def get_chunks(request: Request) -> Response:
    chunk = parse_chunk_request(request.path_params["ids"], request.query_params.multi_items())
    _check_enabled(request, chunk.compression)
    store = request.app.state.store
    async with _chunk_slots(request):  # at most `Threads` chunks served at once (spec 3.3)
        reads = await to_thread.run_sync(source.plan_reads, store, chunk)
        total = sum(r.length for _, r in reads)
        media_type = codecs.content_type(chunk.compression)
        if total <= IN_MEMORY_CHUNK_LIMIT:
            async with _chunk_memory(request).hold(total):
                parts = await to_thread.run_sync(source.read, store, reads)
                if chunk.compression != codecs.NONE:
                    body = await to_thread.run_sync(codecs.encode_parts, parts, chunk.compression, chunk.level)
                else:
                    body = b"".join(parts)
                del parts
            return Response(body, media_type=media_type)
    return _streamed_chunk(store, reads, total, chunk.compression, media_type, chunk.level)


def _streamed_chunk(store, reads, total: int, compression: str, media_type: str,
                    level: int | None = None) -> Response:
    """A chunk larger than IN_MEMORY_CHUNK_LIMIT: read, and compress, block by block."""
    blocks = source.read_blocks(store, reads, _FEED_BLOCK)
    encoder = codecs.stream_encoder(compression, level)

    async def body() -> AsyncIterator[bytes]:
        while (block := await to_thread.run_sync(next, blocks, None)) is not None:
            if out := await to_thread.run_sync(encoder.encode, block):
                yield out
        if tail := encoder.finish():
            yield tail

    headers = {"Content-Length": str(total)} if compression == codecs.NONE else None
    return StreamingResponse(body(), media_type=media_type, headers=headers)


# -- jobs: pull, push, bidirectional send ------------------------------------------------------

async def _query(request: Request) -> tuple[dict, TransferQuery]:
    body = await _json_body(request)
    query = TransferQuery.from_json(body)  # 400 for a malformed query
    return body, query


def _job_content(body: dict, query: TransferQuery) -> dict:
    """What `Content` shows from the first step: the query's Resources verbatim, Peer, Compression."""
    content = {"Compression": query.compression, "Peer": query.peer, "Resources": body["Resources"]}
    if query.originator is not None:
        content["Originator"] = query.originator
    return content


async def post_pull(request: Request) -> Response:
    body, query = await _query(request)
    request.app.state.peers.get(query.peer)  # unknown peer: 404 now, not a failed job later
    job_id = await request.app.state.jobs.submit(pull.JOB_TYPE, body, query.job_priority, _job_content(body, query))
    return json_answer(Created.job(job_id).to_json())


async def post_send(request: Request) -> Response:
    body, query = await _query(request)
    peer = request.app.state.peers.get(query.peer)
    await gateway_fetch(request, query.resources)  # gateway mode: from the Orthanc behind us first
    remote_self = peer.peer.remote_self
    if remote_self is None:
        job_id = await request.app.state.jobs.submit(
            push.JOB_TYPE, body, query.job_priority, _job_content(body, query))
        return json_answer(Created.job(job_id).to_json())
    # Bidirectional: ask the peer to pull from us (spec 3.5); Priority is not forwarded.
    response = await peer.request(
        "POST", "/transfers/pull",
        json={"Compression": query.compression, "Originator": request.app.state.originator,
              "Peer": remote_self, "Resources": body["Resources"],
              **({"StrictCompression": True} if query.strict else {})},  # ignored by the plugin
        headers={"sender-transfer-id": query.sender_transfer_id or str(uuid.uuid4()), "Expect": ""},
        what="request to pull from us (bidirectional send)", expect_json=True, max_body=SMALL_ANSWER,
    )
    try:
        created = Created.from_json(response.json())
    except (ValueError, OrthancError) as exc:
        raise NetworkProtocol(f"peer {query.peer!r} answered a malformed job creation: {exc}") from exc
    return json_answer({"Peer": query.peer, "RemoteJob": created.id, "URL": peer.peer.url + created.path})


# -- receiver role -----------------------------------------------------------------------------

async def post_push(request: Request) -> Response:
    plan = PushTransaction.from_json(await _json_body(request))
    _check_enabled(request, plan.compression)
    tx_id = await to_thread.run_sync(_receiver(request).create, plan)
    return json_answer(Created.push_transaction(tx_id).to_json())


async def put_bucket(request: Request) -> Response:
    receiver = _receiver(request)
    tx, index = receiver.begin_bucket(request.path_params["tx"], request.path_params["index"])
    try:
        writer = receiver.bucket_writer(tx, index)
    except BaseException:
        receiver.end_bucket(tx, index)
        raise
    try:
        # Deflate never grows data by more than ~0.1 % + a few bytes; anything beyond is refused.
        expected = bucket_size(tx.plan.buckets[index])
        limit = expected + expected // 100 + 1024
        pending: list[bytes] = []
        pending_size = 0
        async for piece in request.stream():
            pending.append(piece)
            pending_size += len(piece)
            if writer.received + pending_size > limit:
                raise BodyTooLarge(f"Bucket {index} body exceeds {limit} bytes for {expected} raw bytes")
            if pending_size >= _FEED_BLOCK:
                await to_thread.run_sync(writer.feed, b"".join(pending))
                pending, pending_size = [], 0
                tx.touch()
        rest = b"".join(pending)

        def land() -> None:  # one hop to a worker thread: the last piece, then the bucket lands
            writer.feed(rest)
            receiver.land(tx, index, writer)  # staged and logged; its verification is queued
        await to_thread.run_sync(land)
    except NetworkProtocol as exc:
        raise NetworkProtocol(f"Bucket {index}: {exc.details}") from exc
    finally:
        writer.close()
        receiver.end_bucket(tx, index)
    return json_answer({})


async def post_commit(request: Request) -> Response:
    await _receiver(request).commit(request.path_params["tx"])
    return json_answer({})


async def delete_push(request: Request) -> Response:
    await to_thread.run_sync(_receiver(request).discard, request.path_params["tx"])
    return json_answer({})


def routes() -> list[Route]:
    tx = "/transfers/push/{tx:txid}"
    return [
        route("/plugins", GET=get_plugins),
        route("/plugins/transfers", GET=get_plugin),
        route("/transfers/lookup", POST=post_lookup),
        route("/transfers/capabilities", GET=get_capabilities),
        route("/transfers/pull", POST=post_pull),
        route("/transfers/send", POST=post_send),
        route("/transfers/chunks/{ids:path}", GET=get_chunks),
        route("/transfers/push", POST=post_push),
        route(f"{tx}/commit", POST=post_commit),
        route(f"{tx}/{{index:digits}}", PUT=put_bucket),
        route(tx, DELETE=delete_push),
    ]


def _chunk_memory(request: Request) -> ByteBudget:
    state = request.app.state
    if getattr(state, "chunk_memory", None) is None:
        state.chunk_memory = ByteBudget(CHUNK_MEMORY)
    return state.chunk_memory


def _chunk_slots(request: Request) -> anyio.Semaphore:
    """Created on first use: an anyio semaphore needs the running event loop."""
    state = request.app.state
    if getattr(state, "chunk_slots", None) is None:
        state.chunk_slots = anyio.Semaphore(state.config.transfers.threads)
    return state.chunk_slots
