"""A plain Orthanc (any version, no plugin) as a replication end, through its REST API.

Orthanc's own `Replicate.py` makes one request at a time; over a LAN that is still fine per
request, but only many at once keep both servers busy, so every listing, MD5 question, read and
write here runs `workers` requests at once. Requests go through a `PeerClient`, so they get its
retries with backoff, deadlines and bounded answers.

The MD5 of an instance comes from `GET /instances/{id}/attachments/dicom/md5` (every version has
it); its size from the `FileSize` of the instance's JSON. A write is a `POST /instances` whose
answer must name the same instance; what the target really holds is checked later, by MD5.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from accelerator.peers import MAX_ANSWER, SMALL_ANSWER, PeerClient, json_answer
from accelerator.replication.ends import InstanceEntry, Selection
from accelerator.transfers.workers import run_pool
from protocol.errors import NetworkProtocol, UnknownResource

WORKERS = 16  # requests at once: enough to keep a LAN Orthanc busy, few enough to be polite
LISTING_ANSWER = 256 * 1024 * 1024  # bytes of a /tools/find or /studies/{id}/instances answer
_MD5_ANSWER = 4096  # bytes of an MD5 answer (32 hex digits), or of the error JSON of a 404
CHANGES_PAGE = 1000  # entries of /changes read at once


class OrthancRest:
    """Source and target: an Orthanc REST API. `client` carries the URL and the credentials."""

    def __init__(self, client: PeerClient, *, workers: int = WORKERS, max_instance: int = MAX_ANSWER):
        self.client = client
        self.name = client.url.rstrip("/")
        self.workers = max(1, workers)
        self.max_instance = max_instance

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- source ------------------------------------------------------------------------------

    async def studies(self, selection: Selection) -> list[dict[str, Any]]:
        """The expanded studies matching the selection (`/tools/find`, any Orthanc version)."""
        body = {"Level": "Study", "Query": selection.to_json(), "Expand": True}
        found = await self.client.request_json("POST", "/tools/find", json=body, what="find of the studies",
                                               max_body=LISTING_ANSWER)
        if not isinstance(found, list) or not all(isinstance(s, dict) and "ID" in s for s in found):
            raise NetworkProtocol(f"{self.name}: /tools/find answered something else than a list of studies")
        return found

    async def study_instances(self, study: dict[str, Any]) -> list[tuple[str, str, int]]:
        """(instance ID, series ID, file size) of every instance of one expanded study."""
        answer = await self.client.request_json("GET", f"/studies/{study['ID']}/instances",
                                                what=f"instances of study {study['ID']}",
                                                max_body=LISTING_ANSWER)
        if not isinstance(answer, list):
            raise NetworkProtocol(f"{self.name}: the instances of study {study['ID']} are not a list")
        return [(str(i["ID"]), str(i.get("ParentSeries", "")), int(i.get("FileSize", -1))) for i in answer]

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        studies = await self.studies(selection)
        listed: list[tuple[str, str, str, str, int]] = []  # instance, series, study, patient, size

        async def list_study(position: int) -> None:
            study = studies[position]
            for instance, series, size in await self.study_instances(study):
                listed.append((instance, series, study["ID"], str(study.get("ParentPatient", "")), size))

        await run_pool(range(len(studies)), self.workers, list_study)
        md5s = await self.md5s(item[0] for item in listed)
        entries = []
        for instance, series, study, patient, size in listed:
            if instance in md5s:  # an instance deleted since it was listed is not copied
                if size < 0:
                    size = await self._size(instance)
                entries.append(InstanceEntry(instance, size, md5s[instance], patient, study, series))
        return sorted(entries, key=lambda e: e.id)

    async def _size(self, instance_id: str) -> int:
        response = await self.client.request("GET", f"/instances/{instance_id}/attachments/dicom/size",
                                             what=f"size of instance {instance_id}", max_body=_MD5_ANSWER)
        return int(response.text.strip())

    async def read(self, instance_id: str) -> bytes:
        response = await self.client.request("GET", f"/instances/{instance_id}/file", accept_statuses=(404,),
                                             what=f"file of instance {instance_id}", max_body=self.max_instance)
        if response.status_code == 404:
            raise UnknownResource(f"instance {instance_id} is no longer on {self.name}")
        return response.content

    # -- target ------------------------------------------------------------------------------

    async def md5s(self, instance_ids: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(instance_ids))
        found: dict[str, str] = {}

        async def ask(position: int) -> None:
            instance = wanted[position]
            response = await self.client.request(
                "GET", f"/instances/{instance}/attachments/dicom/md5", accept_statuses=(404,),
                what=f"MD5 of instance {instance}", max_body=_MD5_ANSWER)
            if response.status_code == 200:
                found[instance] = response.text.strip().lower()

        await run_pool(range(len(wanted)), self.workers, ask)
        return found

    async def write(self, instance_id: str, data: bytes) -> None:
        response = await self.client.request(
            "POST", "/instances", content=data, what=f"POST /instances of instance {instance_id}",
            headers={"Content-Type": "application/dicom", "Expect": ""}, max_body=SMALL_ANSWER, expect_json=True)
        answer = json_answer(response)
        stored = answer.get("ID") if isinstance(answer, dict) else None
        if stored != instance_id:
            raise NetworkProtocol(f"{self.name} stored instance {instance_id} as {stored!r}")

    async def census(self, study_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(series, instances) that the target counts in each of these studies it holds."""
        wanted = list(dict.fromkeys(study_ids))
        found: dict[str, tuple[int, int]] = {}

        async def count(position: int) -> None:
            study = wanted[position]
            response = await self.client.request("GET", f"/studies/{study}/statistics", accept_statuses=(404,),
                                                 what=f"statistics of study {study}", max_body=SMALL_ANSWER,
                                                 expect_json=False)
            if response.status_code == 200:
                stats = json_answer(response)
                found[study] = (int(stats["CountSeries"]), int(stats["CountInstances"]))

        await run_pool(range(len(wanted)), self.workers, count)
        return found

    # -- follow ------------------------------------------------------------------------------

    async def changes(self, since: int | None) -> tuple[int, int]:
        """(new instances after `since`, last sequence number) of the `/changes` log; with
        None, only the last sequence number (`?last`)."""
        path = "/changes?last" if since is None else f"/changes?since={since}&limit={CHANGES_PAGE}"
        answer = await self.client.request_json("GET", path, what="changes", max_body=LISTING_ANSWER)
        try:
            items = answer.get("Changes", [])
            last = int(answer["Last"])
            new = sum(1 for c in items if c.get("ChangeType") == "NewInstance")
        except (AttributeError, KeyError, TypeError, ValueError):
            raise NetworkProtocol(f"{self.name}: malformed /changes answer") from None
        return (0 if since is None else new), last
