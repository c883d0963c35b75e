"""The PullTransfer job: lookup on the source, fetch buckets, verify, store all at once (8.1).

Better than the plugin while wire-compatible: every bucket that lands is recorded in the job's
checkpoint, so a paused, failed-then-resumed or killed job continues with the buckets it had not
finished; a bucket whose payload is corrupt is fetched again; instances that fail their MD5 check
have their buckets fetched again before the job gives up; and the study becomes visible in one
index transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from anyio import to_thread

from accelerator.jobs.base import JobContext, JobFailure
from accelerator.peers import Peers
from accelerator.store import Store
from accelerator.transfers.download import Assembly, DownloadArea, PayloadWriter
from accelerator.transfers.workers import Counters, run_pool
from protocol.chunks import chunk_uri, scatter_ranges
from protocol.errors import NetworkProtocol, OrthancError
from protocol.messages import (
    InstanceInfo,
    LookupAnswer,
    TransferQuery,
    bucket_size,
    bucket_to_json,
    lookup_request_to_json,
    parse_bucket,
    size_mb,
)
from protocol.planner import adaptive_bucket_size, plan_pull_buckets

log = logging.getLogger(__name__)

JOB_TYPE = "PullTransfer"
VERIFY_ROUNDS = 2  # re-fetch rounds for instances that fail their MD5 check
_FEED_BLOCK = 1 << 20


class PullDriver:
    def __init__(self, *, store: Store, peers: Peers, folder: Path, bucket_size: int, threads: int,
                 retries: int, skip_stored: bool = False, adaptive: bool = True):
        self.store = store
        self.peers = peers
        self.folder = Path(folder)
        self.bucket_size = bucket_size
        self.threads = threads
        self.retries = retries
        self.skip_stored = skip_stored
        self.adaptive = adaptive

    def area(self, ctx: JobContext, instances: list[InstanceInfo]) -> DownloadArea:
        return DownloadArea(self.folder / ctx.job_id, instances)

    async def run(self, ctx: JobContext) -> None:
        query = TransferQuery.from_json(ctx.query)
        peer = self.peers.get(query.peer)
        state = ctx.checkpoint or await self._plan(ctx, query, peer)
        if state is None:
            return  # nothing to transfer
        instances = [InstanceInfo.from_json(i) for i in state["instances"]]
        buckets = [parse_bucket(b) for b in state["buckets"]]
        done: set[int] = set(state["done"])
        area = self.area(ctx, instances)
        await to_thread.run_sync(area.create)
        assembly = Assembly(area, buckets, landed=done)
        counters = Counters(len(buckets), completed=len(done))
        received = state.get("received", 0)

        async def fetch(index: int) -> None:
            nonlocal received
            bucket = buckets[index]
            writer = await self._fetch(peer, query, bucket, index, area)
            await to_thread.run_sync(assembly.landed, index, writer.digests)  # verify, sync, parse
            done.add(index)
            received += writer.received
            counters.bucket_done(writer.received)
            await ctx.save(dict(state, done=sorted(done), received=received),
                           content=counters.content("DownloadedSizeMB", received), progress=counters.progress)

        started = time.monotonic()
        for verify_round in range(VERIFY_ROUNDS + 1):
            await run_pool([i for i in range(len(buckets)) if i not in done], self.threads, fetch)
            fetched = time.monotonic()
            bad = await to_thread.run_sync(assembly.settle, 2)
            if not bad:
                break
            if verify_round == VERIFY_ROUNDS:
                raise JobFailure(f"{len(bad)} instance(s) from peer {query.peer!r} fail their MD5 check "
                                 f"after {VERIFY_ROUNDS} re-fetches: {', '.join(bad[:5])}")
            log.warning("job %s: %d instance(s) fail their MD5 check, fetching their buckets again",
                        ctx.job_id, len(bad))
            done -= assembly.refetch(bad)

        settled = time.monotonic()
        try:
            await to_thread.run_sync(lambda: self.store.ingest_files(assembly.files(), origin="Plugins"))
        except OrthancError as exc:
            raise JobFailure(f"cannot store the instances pulled from {query.peer!r}: {exc}") from exc
        await to_thread.run_sync(area.remove)
        log.info("job %s: %d bucket(s) from %r in %.2f s, verified in %.2f s, committed %d instance(s) in %.2f s",
                 ctx.job_id, len(buckets), query.peer, fetched - started, settled - fetched, len(instances),
                 time.monotonic() - settled)

    async def _fetch(self, peer, query: TransferQuery, bucket, index: int, area: DownloadArea) -> PayloadWriter:
        """GET one bucket, streaming it into the instance files. The peer client retries the
        request; a body that breaks or decodes badly is fetched again here."""
        size = bucket_size(bucket)
        uri = chunk_uri(bucket, query.compression)
        for attempt in range(1 + self.retries):
            writer = area.payload_writer(scatter_ranges(bucket), query.compression, size, spool=False)
            async with peer.stream("GET", uri, what=f"GET bucket {index} ({size} bytes)") as response:
                try:
                    await _receive(response, writer)
                    return writer
                except (httpx.TransportError, NetworkProtocol) as exc:
                    cause = exc.details if isinstance(exc, NetworkProtocol) else f"{type(exc).__name__}: {exc}"
            if attempt == self.retries:
                raise NetworkProtocol(f"peer {query.peer!r}: GET bucket {index} ({uri.split('?')[0]}) failed "
                                      f"after {attempt + 1} attempts: the answer is corrupt or cut short: {cause}")
            log.warning("job %s: bucket %d from %r is corrupt or cut short (%s), fetching it again",
                        area.folder.name, index, query.peer, cause)
        raise AssertionError("unreachable")

    async def _plan(self, ctx: JobContext, query: TransferQuery, peer) -> dict[str, Any] | None:
        response = await peer.request(
            "POST", "/transfers/lookup", json=lookup_request_to_json(query.resources),
            headers={"sender-transfer-id": sender_transfer_id(ctx), "Expect": ""}, what="lookup", expect_json=True,
        )
        try:
            lookup = LookupAnswer.from_json(response.json())
        except (ValueError, OrthancError) as exc:
            raise NetworkProtocol(f"peer {query.peer!r} answered a malformed lookup: {exc}") from exc
        if query.originator is not None and lookup.originator != query.originator:
            raise JobFailure(f"peer {query.peer!r} is not the server that asked for this pull "
                             f"(Originator {lookup.originator} != {query.originator}): check RemoteSelf")
        instances = list(lookup.instances)
        if self.skip_stored or query_skip_stored(ctx.query):
            instances = await to_thread.run_sync(self._not_stored, instances)
        if not instances:
            await ctx.save(None, progress=1.0)
            return None
        total = sum(i.size for i in instances)
        size = adaptive_bucket_size(total, self.bucket_size, self.threads) if self.adaptive else self.bucket_size
        buckets = plan_pull_buckets(instances, size, peer.url, query.compression)
        state = {"instances": [i.to_json() for i in instances],
                 "buckets": [bucket_to_json(b) for b in buckets], "done": [], "received": 0}
        await ctx.save(state, content={"TotalInstances": len(instances), "TotalSizeMB": size_mb(total),
                                       "CompletedHttpQueries": 0, "DownloadedSizeMB": 0},
                       progress=1 / (2 + len(buckets)))
        return state

    def _not_stored(self, instances: list[InstanceInfo]) -> list[InstanceInfo]:
        index = self.store.index
        return [i for i in instances if not (index.exists(i.id) and index.attachment(i.id).md5 == i.md5)]

    async def discard(self, ctx: JobContext) -> None:
        await to_thread.run_sync(lambda: DownloadArea(self.folder / ctx.job_id, []).remove())


async def _receive(response: httpx.Response, writer: PayloadWriter) -> None:
    """Feed the body to the writer in pieces of about 1 MiB, in a worker thread."""
    pending: list[bytes] = []
    size = 0
    async for piece in response.aiter_raw():
        pending.append(piece)
        size += len(piece)
        if size >= _FEED_BLOCK:
            await to_thread.run_sync(writer.feed, b"".join(pending))
            pending, size = [], 0
    await to_thread.run_sync(writer.feed, b"".join(pending))
    await to_thread.run_sync(writer.finish)


def sender_transfer_id(ctx: JobContext) -> str:
    """The query's SenderTransferID, or a UUID stable for the job's life (spec 2.4)."""
    given = ctx.query.get("SenderTransferID")
    return given if isinstance(given, str) else str(uuid.uuid5(uuid.NAMESPACE_URL, ctx.job_id))


def query_skip_stored(query: dict[str, Any]) -> bool:
    return query.get("SkipStoredInstances") is True
