"""The OrthancPeerStore job: `POST /peers/{name}/store` to a peer without the transfers protocol.

What Orthanc's own job does (OrthancServer/Sources/ServerJobs/OrthancPeerStoreJob.cpp): one
`POST /instances` per instance, the DICOM file as the body (gzip with `Content-Encoding: gzip`
when `Compress`), success only on HTTP 200; a failed instance fails the job unless `Permissive`
(then it is counted in `FailedInstancesCount`), and so does an instance deleted since the job was
submitted. Its `Content` is Orthanc's: Description, InstancesCount, FailedInstancesCount,
ParentResources, Peer, Compress, Size (bytes sent, a string) and SizeMB.

Unlike Orthanc: each request goes through the peer's `PeerClient`, so it is retried with backoff
on transport errors and 5xx (`Transfers.MaxHttpRetries`) before it counts as failed; up to
`workers` instances are sent at once (Orthanc sends one at a time, which is latency-bound on a
long link); and the job resumes after a pause or a restart of the daemon with the first instance
not yet sent (the checkpoint is saved at most once a second, so a restart may send the last
second's instances again: the peer answers them AlreadyStored, or stores them again).
"""

from __future__ import annotations

import gzip
import logging
import time
from typing import Any

from anyio import to_thread

from accelerator import metrics
from accelerator.jobs import move_storage
from accelerator.jobs.base import JobContext, JobFailure
from accelerator.peers import SMALL_ANSWER, Peers
from accelerator.store import Store
from accelerator.transfers.workers import run_pool
from protocol.errors import OrthancError, UnknownResource

log = logging.getLogger(__name__)

JOB_TYPE = "OrthancPeerStore"  # Orthanc's job type for the same work
DESCRIPTION = "REST API"  # what Orthanc's REST API sets as the job's Description
WORKERS = 4
SAVE_INTERVAL = 1.0  # seconds between two saves of the checkpoint, at most
MEGA_BYTES = 1024 * 1024


def content(*, parents: list[str], instances: int, failed: int, peer: Any, compress: bool, size: int) -> dict:
    """The job's public Content, as Orthanc's OrthancPeerStoreJob::GetPublicContent."""
    shown = {"Description": DESCRIPTION, "InstancesCount": instances, "FailedInstancesCount": failed,
             "Peer": peer, "Compress": compress, "Size": str(size), "SizeMB": size // MEGA_BYTES}
    if parents:  # Orthanc leaves the field out when empty
        shown["ParentResources"] = sorted(set(parents))
    return shown


class PeerStoreDriver:
    """One driver for every OrthancPeerStore job. The job's query: `Peer` (name), `Resources`
    (Orthanc IDs of any level), `Compress`, `Permissive`, `PeerContent` (the Peer of Content)."""

    def __init__(self, *, store: Store, peers: Peers, workers: int = WORKERS):
        self.store = store
        self.peers = peers
        self.workers = max(1, workers)

    async def run(self, ctx: JobContext) -> None:
        query = ctx.query
        peer = self.peers.get(query["Peer"])
        compress, permissive = bool(query.get("Compress")), bool(query.get("Permissive"))
        state = ctx.checkpoint or await self._plan(ctx, query)
        instances: list[str] = state["Instances"]
        failed: set[str] = set(state["Failed"])
        progress = {"next": state["Next"], "size": state["Size"], "saved": time.monotonic()}
        done: set[int] = set()

        def snapshot() -> tuple[dict, dict, float]:
            checkpoint = {"Instances": instances, "Next": progress["next"], "Failed": sorted(failed),
                          "Size": progress["size"]}
            shown = content(parents=query["Resources"], instances=len(instances), failed=len(failed),
                            peer=query["PeerContent"], compress=compress, size=progress["size"])
            return checkpoint, shown, (progress["next"] + len(done)) / max(1, len(instances))

        async def send(position: int) -> None:
            instance = instances[position]
            try:
                body = await to_thread.run_sync(self._body, instance, compress)
                headers = {"Content-Type": "application/dicom", "Expect": ""}
                if compress:
                    headers["Content-Encoding"] = "gzip"
                with metrics.in_flight(metrics.PEER_STORE):
                    await peer.request("POST", "/instances", content=body, headers=headers,
                                       what=f"POST /instances of instance {instance}", max_body=SMALL_ANSWER)
            except OrthancError as exc:
                if not permissive:
                    if isinstance(exc, UnknownResource):
                        raise JobFailure(f"instance {instance} was deleted after the job was submitted") from exc
                    raise
                log.warning("job %s: instance %s not sent to %r (permissive): %s",
                            ctx.job_id, instance, query["Peer"], exc)
                failed.add(instance)
            else:
                progress["size"] += len(body)
                metrics.bucket_done(metrics.PEER_STORE, len(body))
            done.add(position)
            while progress["next"] in done:
                done.discard(progress["next"])
                progress["next"] += 1
            checkpoint, shown, fraction = snapshot()
            if time.monotonic() - progress["saved"] >= SAVE_INTERVAL:
                progress["saved"] = time.monotonic()
                await ctx.save(checkpoint, content=shown, progress=fraction)
            else:
                ctx.report(content=shown, progress=fraction)

        await run_pool(range(progress["next"], len(instances)), self.workers, send)
        checkpoint, shown, _ = snapshot()
        await ctx.save(checkpoint, content=shown, progress=1.0)

    async def _plan(self, ctx: JobContext, query: dict) -> dict:
        instances = await to_thread.run_sync(move_storage.expand, self.store.index, query["Resources"])
        state = {"Instances": instances, "Next": 0, "Failed": [], "Size": 0}
        await ctx.save(state, content=content(parents=query["Resources"], instances=len(instances), failed=0,
                                              peer=query["PeerContent"], compress=bool(query.get("Compress")),
                                              size=0))
        return state

    def _body(self, instance: str, compress: bool) -> bytes:
        """The instance's DICOM file (checked against its MD5), gzipped when asked (blocking)."""
        data = self.store.read_file(instance)
        return gzip.compress(data, compresslevel=6) if compress else data

    async def discard(self, ctx: JobContext) -> None:
        """Nothing to release: every instance sent is the peer's own business."""
