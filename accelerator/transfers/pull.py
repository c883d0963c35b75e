"""The PullTransfer job: lookup on the source, fetch buckets, verify, store all at once (8.1).

Better than the plugin while wire-compatible: every bucket that lands is recorded, so a paused,
failed-then-resumed or killed job continues with the buckets it had not finished; a bucket whose
payload is corrupt, cut short or late is fetched again; instances that fail their MD5 check have
their buckets fetched again before the job gives up; and the study becomes visible in one index
transaction.

The source is another host and is trusted with nothing: its lookup answer is read up to a bound
that follows `Transfers.MaxTransferInstances`, checked against the transfer limits and the free
disk space before any plan is made, and the plan (a 1 TiB pull has 131,072 buckets) is made in a
worker thread, off the event loop. The plan is saved once, in the job's checkpoint; a bucket that
lands adds a line to the `LandedLog` of the download area instead of rewriting the plan.

"gzip" from one of our daemons travels as shuffle-zstd when its lookup answer advertises it
("Codecs", a key the plugin's answer lacks) and the query is not strict; the codec is saved with
the plan (a restarted job keeps it) and its level follows the link's measured speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from anyio import to_thread

from accelerator import metrics
from accelerator.jobs.base import JobContext, JobFailure
from accelerator.peers import PeerClient, Peers, advertised_codecs
from accelerator.store import Store
from accelerator.transfers.download import (
    Assembly,
    DownloadArea,
    LandedLog,
    LinkMeter,
    PayloadWriter,
    ensure_free_space,
)
from accelerator.transfers.workers import Counters, run_pool
from protocol import codecs
from protocol.chunks import chunk_uri, scatter_ranges
from protocol.errors import FullStorage, NetworkProtocol, OrthancError, ParameterOutOfRange
from protocol.limits import TransferLimits
from protocol.messages import (
    Bucket,
    InstanceInfo,
    LookupAnswer,
    TransferQuery,
    bucket_size,
    bucket_to_json,
    lookup_request_to_json,
    parse_bucket,
    size_mb,
)
from protocol.planner import adaptive_bucket_size, bucket_count_bound, plan_pull_buckets, taper

log = logging.getLogger(__name__)

JOB_TYPE = "PullTransfer"
VERIFY_ROUNDS = 2  # re-fetch rounds for instances that fail their MD5 check
_FEED_BLOCK = 1 << 20
LOOKUP_BYTES_PER_INSTANCE = 512  # of a lookup answer (the plugin's take about 150)
LOOKUP_OVERHEAD = 64 * 1024  # bytes of a lookup answer besides its instances
_DETAILS_SHOWN = 300  # characters of a peer's malformed answer quoted in a job's ErrorDetails


@dataclass(frozen=True)
class Plan:
    """What a pull fetches, as saved once in the checkpoint. `landed` and `received` are what
    the checkpoint itself recorded (checkpoints written before the `LandedLog` existed); `codec`
    is the encoding negotiated with the peer (None in older checkpoints: the query's)."""

    instances: list[InstanceInfo]
    buckets: list[Bucket]
    landed: frozenset[int] = frozenset()
    received: int = 0
    codec: str | None = None

    @property
    def total_size(self) -> int:
        return sum(info.size for info in self.instances)

    def to_state(self) -> dict[str, Any]:
        return {"instances": [i.to_json() for i in self.instances],
                "buckets": [bucket_to_json(b) for b in self.buckets], "done": [], "received": 0,
                "codec": self.codec}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Plan:
        """Blocking for a large plan (100,000 buckets take half a second): call in a thread."""
        return cls([InstanceInfo.from_json(i) for i in state["instances"]],
                   [parse_bucket(b) for b in state["buckets"]],
                   frozenset(state.get("done", ())), state.get("received", 0), state.get("codec"))


@dataclass
class _Download:
    """One run of a pull: its plan, download area, and the buckets landed so far."""

    plan: Plan
    area: DownloadArea
    assembly: Assembly
    log: LandedLog
    done: set[int] = field(default_factory=set)
    received: int = 0
    meter: LinkMeter = field(default_factory=LinkMeter)

    def landed(self, index: int, writer: PayloadWriter) -> None:
        """Bucket `index` is written: hand what it completes to the background verifier, then
        log it. Quick (the verification is not on the request path), but it writes to the log:
        call in a worker thread."""
        self.assembly.landed(index, writer.digests)
        self.log.landed(index, writer.received)

    def again(self, bad_instances: list[str]) -> None:
        """The buckets of instances that fail their MD5 check are to be fetched again."""
        buckets = self.assembly.refetch(bad_instances)
        self.log.again(buckets)
        self.done -= buckets

    def pending(self) -> list[int]:
        return [i for i in range(len(self.plan.buckets)) if i not in self.done]


class PullDriver:
    def __init__(self, *, store: Store, peers: Peers, folder: Path, bucket_size: int, threads: int,
                 retries: int, skip_stored: bool = False, adaptive: bool = True,
                 limits: TransferLimits | None = None):
        self.store = store
        self.peers = peers
        self.folder = Path(folder)
        self.bucket_size = bucket_size
        self.threads = threads
        self.retries = retries
        self.skip_stored = skip_stored
        self.adaptive = adaptive
        self.limits = limits or peers.config.transfers.limits

    @property
    def lookup_bound(self) -> int:
        """Bytes of a lookup answer read at most: room for `MaxTransferInstances` instances."""
        return LOOKUP_OVERHEAD + LOOKUP_BYTES_PER_INSTANCE * self.limits.max_instances

    def area(self, ctx: JobContext, instances: list[InstanceInfo]) -> DownloadArea:
        return DownloadArea(self.folder / ctx.job_id, instances)

    async def run(self, ctx: JobContext) -> None:
        query = TransferQuery.from_json(ctx.query)
        peer = self.peers.get(query.peer)
        state = ctx.checkpoint
        plan = await self._plan(ctx, query, peer) if state is None else \
            await to_thread.run_sync(Plan.from_state, state)
        if plan is None:
            return  # nothing to transfer
        if plan.codec is not None and plan.codec != query.compression:
            query = dataclasses.replace(query, compression=plan.codec)  # what the buckets travel in
        download = await to_thread.run_sync(self._open, ctx, plan)
        try:
            started = time.monotonic()
            await self._download(ctx, query, peer, download)
        finally:
            download.log.close()
        settled = time.monotonic()
        try:
            await to_thread.run_sync(lambda: self.store.ingest_files(download.assembly.files(), origin="Plugins"))
        except OrthancError as exc:
            raise JobFailure(f"cannot store the instances pulled from {query.peer!r}: {exc}") from exc
        await to_thread.run_sync(download.area.remove)
        log.info("job %s: %d bucket(s) from %r fetched and verified in %.2f s, committed %d instance(s) in %.2f s",
                 ctx.job_id, len(plan.buckets), query.peer, settled - started, len(plan.instances),
                 time.monotonic() - settled)

    def _open(self, ctx: JobContext, plan: Plan) -> _Download:
        """The download area, ready, with what landed before (blocking: in a worker thread)."""
        area = self.area(ctx, plan.instances).create()
        landed = LandedLog(area.folder)
        logged, received = landed.read()
        done = {i for i in plan.landed | logged if 0 <= i < len(plan.buckets)}
        return _Download(plan, area, Assembly(area, plan.buckets, landed=done), landed, done,
                         plan.received + received)

    async def _download(self, ctx: JobContext, query: TransferQuery, peer: PeerClient, download: _Download) -> None:
        """Fetch every bucket not landed yet; then again those of instances failing their MD5."""
        buckets = download.plan.buckets
        counters = Counters(len(buckets), completed=len(download.done))

        async def fetch(index: int) -> None:
            with metrics.in_flight(metrics.PULL):
                writer = await self._fetch(peer, query, buckets[index], index, download.area,
                                           download.meter.level(query.compression))
            await to_thread.run_sync(download.landed, index, writer)
            download.done.add(index)
            download.received += writer.received
            download.meter.add(writer.received)
            metrics.bucket_done(metrics.PULL, writer.received)
            counters.bucket_done(writer.received)
            ctx.report(content=counters.content("DownloadedSizeMB", download.received),
                       progress=counters.progress)

        for verify_round in range(VERIFY_ROUNDS + 1):
            await run_pool(download.pending(), self.threads, fetch)
            bad = await to_thread.run_sync(download.assembly.settle, 2)
            if not bad:
                return
            if verify_round == VERIFY_ROUNDS:
                raise JobFailure(f"{len(bad)} instance(s) from peer {query.peer!r} fail their MD5 check "
                                 f"after {VERIFY_ROUNDS} re-fetches: {', '.join(bad[:5])}")
            log.warning("job %s: %d instance(s) fail their MD5 check, fetching their buckets again",
                        ctx.job_id, len(bad))
            await to_thread.run_sync(download.again, bad)

    async def _fetch(self, peer: PeerClient, query: TransferQuery, bucket: Bucket, index: int,
                     area: DownloadArea, level: int | None = None) -> PayloadWriter:
        """GET one bucket, streaming it into the instance files. The peer client retries the
        request up to its headers and cuts a body that is not complete by the peer's timeout;
        a body that breaks, decodes badly or comes too late is fetched again here. `level` (the
        negotiated codec's, from the link's speed) never reaches a plugin's URI."""
        size = bucket_size(bucket)
        uri = chunk_uri(bucket, query.compression, level)
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
                                      f"after {attempt + 1} attempts: the answer is corrupt, cut short or "
                                      f"late: {cause}")
            log.warning("job %s: bucket %d from %r is corrupt, cut short or late (%s), fetching it again",
                        area.folder.name, index, query.peer, cause)
        raise AssertionError("unreachable")

    async def _plan(self, ctx: JobContext, query: TransferQuery, peer: PeerClient) -> Plan | None:
        """Ask the peer what to fetch, check it, plan it (in a thread) and save the plan once."""
        instances, offered = await self._lookup(ctx, query, peer)
        codec = codecs.negotiate(query.compression, query.strict,
                                 offered if self.peers.config.transfers.negotiated_codecs else ())
        if self.skip_stored or query_skip_stored(ctx.query):
            instances = await to_thread.run_sync(self._not_stored, instances)
        if not instances:
            await ctx.save(None, progress=1.0)
            return None
        await to_thread.run_sync(self.area(ctx, []).remove)  # a stale area, and its log, are not ours
        plan, state = await to_thread.run_sync(self._make_plan, query, peer.url, instances, codec)
        content = {"TotalInstances": len(instances), "TotalSizeMB": size_mb(plan.total_size),
                   "CompletedHttpQueries": 0, "DownloadedSizeMB": 0}
        if codec != query.compression:  # ours only: a job with a plugin has the plugin's fields
            content["Codec"] = codec
        await ctx.save(state, content=content,
                       progress=1 / (2 + len(plan.buckets)))
        return plan

    async def _lookup(self, ctx: JobContext, query: TransferQuery, peer: PeerClient
                      ) -> tuple[list[InstanceInfo], tuple[str, ...]]:
        """The instances to fetch, and the codecs the peer advertises in its answer (ours add
        "Codecs", the plugin's has none)."""
        response = await peer.request(
            "POST", "/transfers/lookup", json=lookup_request_to_json(query.resources),
            headers={"sender-transfer-id": sender_transfer_id(ctx), "Expect": ""}, what="lookup",
            expect_json=True, max_body=self.lookup_bound,
        )
        lookup, offered = await to_thread.run_sync(self._parse_lookup, query.peer, response.content)
        if query.originator is not None and lookup.originator != query.originator:
            raise JobFailure(f"peer {query.peer!r} is not the server that asked for this pull "
                             f"(Originator {lookup.originator} != {query.originator}): check RemoteSelf")
        return list(lookup.instances), offered

    def _parse_lookup(self, name: str, body: bytes) -> tuple[LookupAnswer, tuple[str, ...]]:
        """The lookup answer, within the transfer limits (blocking: tens of MB of JSON)."""
        try:
            answer = orjson.loads(body)
            lookup = LookupAnswer.from_json(answer)
        except (ValueError, OrthancError) as exc:
            raise NetworkProtocol(f"peer {name!r} answered a malformed lookup: {_clip(str(exc))}") from exc
        with _refused(name):
            self.limits.check(lookup.instances, "the lookup answer")
        return lookup, advertised_codecs(answer)

    def _make_plan(self, query: TransferQuery, base_url: str, instances: list[InstanceInfo],
                   codec: str | None = None) -> tuple[Plan, dict]:
        """The plan and its checkpoint, once the disk has room (blocking: in a worker thread)."""
        total = sum(i.size for i in instances)
        size = adaptive_bucket_size(total, self.bucket_size, self.threads) if self.adaptive else self.bucket_size
        with _refused(query.peer):
            ensure_free_space(self.folder, total)
            self.limits.check_chunks(bucket_count_bound(instances, size),
                                     f"the plan at a bucket size of {size} bytes (Transfers.BucketSize)")
        # The plan (URL lengths) is the plugin's for the compression asked: the same buckets
        # whatever the codec; our own server takes the few characters more of a codec's URI.
        # With adaptive sizes, its last round is also cut finer (`taper`).
        buckets = plan_pull_buckets(instances, size, base_url, query.compression)
        plan = Plan(instances, taper(buckets, self.threads) if self.adaptive else buckets,
                    codec=codec or query.compression)
        return plan, plan.to_state()

    def _not_stored(self, instances: list[InstanceInfo]) -> list[InstanceInfo]:
        index = self.store.index
        return [i for i in instances if not (index.exists(i.id) and index.attachment(i.id).md5 == i.md5)]

    async def discard(self, ctx: JobContext) -> None:
        await to_thread.run_sync(lambda: DownloadArea(self.folder / ctx.job_id, []).remove())


@contextlib.contextmanager
def _refused(peer: str) -> Iterator[None]:
    """A transfer beyond the limits or the free disk space fails its job, naming the peer."""
    try:
        yield
    except (ParameterOutOfRange, FullStorage) as exc:
        raise JobFailure(f"cannot pull from peer {peer!r}: {exc.details}") from exc


def _clip(text: str) -> str:
    return text if len(text) <= _DETAILS_SHOWN else f"{text[:_DETAILS_SHOWN]}... ({len(text)} characters)"


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
