"""The PushTransfer job: plan from the index, create the remote transaction, PUT buckets, commit
(spec 8.2). The job succeeds only once the receiver has committed.

Every PUT that succeeded is recorded in the checkpoint with the remote transaction's path, so a
paused or restarted job sends only the buckets the receiver does not have; if the receiver has
lost the transaction meanwhile (404), the push starts again with a new one.

The transaction's encoding is negotiated at its creation: "gzip" to a peer that advertises
shuffle-zstd at GET /transfers/capabilities (404 on the plugin) uses it unless the query is
strict; the level (zstd's, or deflate's for plain gzip) follows the link's measured speed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from anyio import to_thread

from accelerator import metrics
from accelerator.jobs.base import JobContext, JobFailure
from accelerator.peers import SMALL_ANSWER, Peers
from accelerator.store import Store
from accelerator.transfers import source
from accelerator.transfers.budget import ByteBudget
from accelerator.transfers.download import LinkMeter
from accelerator.transfers.pull import sender_transfer_id
from accelerator.transfers.workers import Counters, run_pool
from protocol import codecs
from protocol.chunks import ReadRange
from protocol.errors import NetworkProtocol, OrthancError
from protocol.messages import (
    Created,
    InstanceInfo,
    LookupAnswer,
    PushTransaction,
    TransferQuery,
    bucket_size,
    bucket_to_json,
    parse_bucket,
    size_mb,
)
from protocol.planner import adaptive_bucket_size, plan_push_buckets, taper

log = logging.getLogger(__name__)
_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")

JOB_TYPE = "PushTransfer"
PAYLOAD_MEMORY = 48 * 1024 * 1024  # raw bucket bytes being encoded and sent at once, all jobs
COMMIT_ROUNDS = 3  # commits refused on MD5, with the named buckets sent again in between


class TransactionLost(Exception):
    """The receiver answered 404 for our transaction: it was evicted or discarded."""


class PushDriver:
    def __init__(self, *, store: Store, peers: Peers, bucket_size: int, threads: int, commit_timeout: float,
                 adaptive: bool = True):
        self.store = store
        self.peers = peers
        self.bucket_size = bucket_size
        self.threads = threads
        self.commit_timeout = commit_timeout
        self.adaptive = adaptive
        self.memory = ByteBudget(PAYLOAD_MEMORY)

    async def run(self, ctx: JobContext) -> None:
        query = TransferQuery.from_json(ctx.query)
        peer = self.peers.get(query.peer)
        state = ctx.checkpoint or await self._plan(ctx, query)
        for attempt in range(1, 3):
            if state.get("transaction") is None:
                state = await self._create(ctx, query, peer, state)
            try:
                await self._send(ctx, query, peer, state)
                await self._commit(ctx, query, peer, state)
                break
            except TransactionLost:
                if attempt == 2:
                    raise JobFailure(f"peer {query.peer!r} lost the push transaction twice") from None
                log.warning("job %s: peer %r lost transaction %s, starting a new one",
                            ctx.job_id, query.peer, state["transaction"])
                state = dict(state, transaction=None, cookie=None, done=[], sent=0)
        await ctx.save(dict(state, committed=True), progress=1.0)

    async def _commit(self, ctx: JobContext, query: TransferQuery, peer, state: dict) -> None:
        """Commit; a commit that fails on MD5 gets the named instances' buckets sent again, and a
        404 (the answer to a commit that succeeded was lost, or the transaction was evicted) is
        settled by looking up what the receiver really stores."""
        for attempt in range(1, COMMIT_ROUNDS + 1):
            response = await peer.request(
                "POST", f"{state['transaction']}/commit", content=b"", headers=self._headers(ctx, state),
                timeout=self.commit_timeout, what="commit of the push transaction", accept_statuses=(404, 500))
            if response.status_code == 200:
                return
            if response.status_code == 404:
                if await self._receiver_has_everything(ctx, query, peer, state):
                    log.info("job %s: commit answer lost, but %r stores every instance", ctx.job_id, query.peer)
                    return
                raise TransactionLost()
            if attempt == COMMIT_ROUNDS:
                raise JobFailure(f"peer {query.peer!r} refused the commit {COMMIT_ROUNDS} times: "
                                 f"HTTP 500: {response.text[:300]}")
            resend = self._buckets_of(state, _named_instances(response.text, len(state["instances"])))
            log.warning("job %s: commit refused by %r (%s), sending %d bucket(s) again",
                        ctx.job_id, query.peer, response.text[:200], len(resend))
            state.update(done=sorted(set(state["done"]) - resend))
            await ctx.save(dict(state))
            await self._send(ctx, query, peer, state)

    @staticmethod
    def _buckets_of(state: dict, instance_ids: set[str] | None) -> set[int]:
        """Indices of the buckets holding these instances (all buckets for None)."""
        buckets = [parse_bucket(b) for b in state["buckets"]]
        if instance_ids is None:
            return set(range(len(buckets)))
        return {i for i, b in enumerate(buckets) if any(c.instance_id in instance_ids for c in b)}

    async def _receiver_has_everything(self, ctx: JobContext, query: TransferQuery, peer, state: dict) -> bool:
        wanted = {i["ID"]: i["MD5"] for i in state["instances"]}
        response = await peer.request(
            "POST", "/transfers/lookup", json=[{"Level": "Instance", "ID": i} for i in wanted],
            headers={"sender-transfer-id": sender_transfer_id(ctx), "Expect": ""}, what="lookup after commit",
            accept_statuses=(404,), expect_json=True)
        if response.status_code == 404:
            return False
        try:
            found = {i.id: i.md5 for i in LookupAnswer.from_json(response.json()).instances}
        except (ValueError, OrthancError):
            return False
        return found == wanted

    async def _plan(self, ctx: JobContext, query: TransferQuery) -> dict[str, Any]:
        try:
            instances = await to_thread.run_sync(source.lookup, self.store, query.resources)
        except OrthancError as exc:
            raise JobFailure(f"cannot push: {exc}") from exc
        total = sum(i.size for i in instances)
        size = adaptive_bucket_size(total, self.bucket_size, self.threads) if self.adaptive else self.bucket_size
        buckets = plan_push_buckets(instances, size)
        if self.adaptive:
            buckets = taper(buckets, self.threads)
        state = {"instances": [i.to_json() for i in instances], "buckets": [bucket_to_json(b) for b in buckets],
                 "transaction": None, "cookie": None, "done": [], "sent": 0}
        await ctx.save(state, content={"TotalInstances": len(instances),
                                       "TotalSizeMB": size_mb(total),
                                       "CompletedHttpQueries": 0, "UploadedSizeMB": 0},
                       progress=1 / (2 + len(buckets)))
        return state

    async def _codec(self, query: TransferQuery, peer) -> str:
        """The encoding of a new transaction: "gzip" becomes the better codec when the peer is
        one of ours that advertises it (a plugin answers 404 to the question: plain gzip)."""
        if query.compression != codecs.GZIP or query.strict or not self.peers.config.transfers.negotiated_codecs:
            return query.compression
        return codecs.negotiate(query.compression, query.strict, await peer.codecs())

    async def _create(self, ctx: JobContext, query: TransferQuery, peer, state: dict) -> dict:
        codec = await self._codec(query, peer)
        plan = PushTransaction(tuple(InstanceInfo.from_json(i) for i in state["instances"]),
                               tuple(parse_bucket(b) for b in state["buckets"]), codec)
        response = await peer.request(
            "POST", "/transfers/push", json=plan.to_json(), timeout=self.commit_timeout,
            headers={"sender-transfer-id": sender_transfer_id(ctx), "Expect": ""},
            what="creation of the push transaction", expect_json=True, max_body=SMALL_ANSWER,
        )
        try:
            created = Created.from_json(response.json())
        except (ValueError, OrthancError) as exc:
            raise NetworkProtocol(f"peer {query.peer!r} answered a malformed push creation: {exc}") from exc
        state = dict(state, transaction=created.path, cookie=_cookie(response.headers), codec=codec)
        # "Codec" only when it is not the compression asked: a push to a plugin keeps its fields.
        await ctx.save(state, content={"Codec": codec} if codec != query.compression else None)
        return state

    async def _send(self, ctx: JobContext, query: TransferQuery, peer, state: dict) -> None:
        buckets = [parse_bucket(b) for b in state["buckets"]]
        done: set[int] = set(state["done"])
        counters = Counters(len(buckets), completed=len(done))
        sent = state.get("sent", 0)
        headers = dict(self._headers(ctx, state), **{"Content-Type": "application/octet-stream"})
        codec = state.get("codec") or query.compression  # older checkpoints: the query's
        meter = LinkMeter()

        async def put(index: int) -> None:
            nonlocal sent
            async with self.memory.hold(bucket_size(buckets[index])), metrics.in_flight(metrics.PUSH):  # bounded
                body = await to_thread.run_sync(self._payload, buckets[index], codec, meter.level(codec))
                response = await peer.request(
                    "PUT", f"{state['transaction']}/{index}", content=body, headers=headers,
                    what=f"PUT bucket {index}", accept_statuses=(404,))
            if response.status_code == 404:
                raise TransactionLost()
            done.add(index)
            sent += len(body)
            meter.add(len(body))
            metrics.bucket_done(metrics.PUSH, len(body))
            counters.bucket_done(len(body))
            state.update(done=sorted(done), sent=sent)
            await ctx.save(dict(state), content=counters.content("UploadedSizeMB", sent),
                           progress=counters.progress)

        await run_pool([i for i in range(len(buckets)) if i not in done], self.threads, put)

    def _payload(self, bucket, compression: str, level: int | None = None) -> bytes:
        """Read the bucket's ranges from the storage area (sizes come from the index) and encode."""
        reads = [(self.store.attachment(c.instance_id), ReadRange(c.instance_id, c.offset, c.size))
                 for c in bucket]
        return codecs.encode_parts(source.read(self.store, reads), compression, level)

    @staticmethod
    def _headers(ctx: JobContext, state: dict) -> dict[str, str]:
        headers = {"sender-transfer-id": sender_transfer_id(ctx), "Expect": ""}
        if state.get("cookie"):
            headers["Cookie"] = state["cookie"]
        return headers

    async def discard(self, ctx: JobContext) -> None:
        """After a failure or a cancel: delete the remote transaction (best effort)."""
        state = ctx.checkpoint or {}
        if not state.get("transaction") or state.get("committed"):
            return
        query = TransferQuery.from_json(ctx.query)
        try:
            await self.peers.get(query.peer).request(
                "DELETE", state["transaction"], headers=self._headers(ctx, state), retries=0,
                what="discard of the push transaction", accept_statuses=(404,))
        except OrthancError as exc:
            log.warning("job %s: could not delete the remote transaction: %s", ctx.job_id, exc)


def _named_instances(details: str, declared: int) -> set[str] | None:
    """The instance IDs a refused commit names, or None when it does not name them all."""
    named = set(_ID.findall(details))
    shown = re.search(r"Bad MD5 sum in (\d+)", details)
    if not named or (shown and int(shown.group(1)) > len(named)) or len(named) > declared:
        return None
    return named


def _cookie(headers) -> str | None:
    """Set-Cookie of the creation answer as one Cookie header (spec 2.4); the plugin keeps the
    last one only, we keep them all."""
    values = [v.split(";", 1)[0].strip() for k, v in headers.multi_items() if k.lower() == "set-cookie"]
    return "; ".join(v for v in values if v) or None
