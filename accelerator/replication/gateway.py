"""Gateway mode: this daemon in front of a plain Orthanc that has no transfers plugin.

A site gets the plugin's benefits without installing it: peers push to and pull from this daemon
over the transfers protocol, and this daemon talks to its Orthanc over the LAN, many requests at
once.

- **Forwarding**: every instance our store takes in (a push committed, a pull completed, an
  upload) is forwarded into the Orthanc. The forwarder follows our own changes log (its position
  is kept in `gateway.json` beside the index, so a restart goes on where it was), asks the Orthanc
  for the instance's MD5 first (never re-sends to find out), posts it if needed, and counts it
  forwarded only once the Orthanc answers the right MD5. With `KeepCopies` false, it then leaves
  our store. An Orthanc that is away is retried with a growing pause; nothing is skipped.
- **Taking from the Orthanc**: a lookup by a remote peer, or a send of ours, that names resources
  our store lacks first fetches them from the Orthanc into our store (checked by MD5).
- **What it holds**: `/replication/entries` and `/replication/md5s` answer for the Orthanc.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import anyio
import orjson
from anyio import to_thread

from accelerator.config import Config, GatewayConfig
from accelerator.peers import PeerClient
from accelerator.replication.ends import InstanceEntry, Selection
from accelerator.replication.local import LocalStore
from accelerator.replication.orthanc_rest import LISTING_ANSWER, OrthancRest
from accelerator.store import Store
from accelerator.store.index import NEW_INSTANCE
from accelerator.transfers.workers import run_pool
from protocol.errors import NetworkProtocol, OrthancError, UnknownResource
from protocol.messages import Resource
from protocol.resources import Level

log = logging.getLogger(__name__)

STATE_FILE = "gateway.json"
PAGE = 500  # changes forwarded per round
IDLE = 0.1  # seconds between two looks at the changes log when there is nothing to forward (a local query)
BACKOFF_CAP = 30.0  # seconds, at most, between two attempts at an Orthanc that is away
_LISTING = {Level.PATIENT: "patients", Level.STUDY: "studies", Level.SERIES: "series"}


class Gateway:
    def __init__(self, settings: GatewayConfig, config: Config, store: Store):
        self.settings = settings
        self.store = store
        self.local = LocalStore(store)
        self.orthanc = OrthancRest(PeerClient(settings.as_peer(), config), workers=settings.workers,
                                   max_instance=config.transfers.limits.max_instance_size)
        self.state_path = Path(config.index_directory) / STATE_FILE
        self.forwarded_seq = self._load_seq()

    @property
    def name(self) -> str:
        return self.orthanc.name

    async def aclose(self) -> None:
        await self.orthanc.aclose()

    # -- forwarding --------------------------------------------------------------------------

    def _load_seq(self) -> int:
        try:
            return int(orjson.loads(self.state_path.read_bytes())["ForwardedSeq"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("gateway: %s is unreadable (%s): forwarding everything again", self.state_path, exc)
            return 0

    def _save_seq(self, seq: int) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps({"ForwardedSeq": seq, "Orthanc": self.name}))
        os.replace(temporary, self.state_path)

    async def forward_forever(self) -> None:
        """Forward what our store takes in, until cancelled (the app's lifespan)."""
        failures = 0
        while True:
            try:
                forwarded = await self.forward_once()
                failures = 0
            except OrthancError as exc:
                failures += 1
                wait = min(BACKOFF_CAP, 0.5 * 2 ** min(failures, 8))
                log.warning("gateway: cannot forward to %s (%s); again in %.1f s", self.name, exc, wait)
                await anyio.sleep(wait)
                continue
            if not forwarded:
                await anyio.sleep(IDLE)

    async def forward_once(self) -> int:
        """Forward the next page of new instances; how many there were."""
        changes, _, last = await to_thread.run_sync(self.store.index.changes, self.forwarded_seq, PAGE)
        instances = list(dict.fromkeys(c.public_id for c in changes if c.change_type == NEW_INSTANCE))
        if instances:
            await self.forward(instances)
        if last != self.forwarded_seq:
            self.forwarded_seq = last
            await to_thread.run_sync(self._save_seq, last)
        return len(instances)

    async def forward(self, instance_ids: list[str]) -> None:
        """Make the Orthanc hold these instances of ours, checked by MD5; an instance deleted
        from our store since is skipped. An Orthanc that is away raises (the page is tried again
        later); one that answers but refuses an instance (its filters, an unsupported file) gets
        that instance logged and left in our store, so one bad file never holds up the rest."""
        ours = await self.local.md5s(instance_ids)
        theirs = await self.orthanc.md5s(ours)
        missing = [i for i, md5 in ours.items() if theirs.get(i) != md5]
        refused: dict[str, str] = {}

        async def send(position: int) -> None:
            instance = missing[position]
            try:
                data = await self.local.read(instance)
            except UnknownResource:
                return
            try:
                await self.orthanc.write(instance, data)
            except OrthancError as exc:
                refused[instance] = str(exc.details or exc)

        await run_pool(range(len(missing)), self.settings.workers, send)
        checked = await self.orthanc.md5s(missing)
        for instance in missing:
            if instance in ours and checked.get(instance) != ours[instance] and instance not in refused:
                refused[instance] = f"{self.name} holds MD5 {checked.get(instance)} instead of {ours[instance]}"
        if refused:
            await self._check_reachable()  # away: raise, and the whole page is tried again
            for instance, reason in sorted(refused.items()):
                log.error("gateway: %s did not take instance %s, kept in our store: %s", self.name, instance, reason)
        forwarded = [i for i in missing if i in ours and i not in refused]
        if not self.settings.keep_copies:
            await to_thread.run_sync(self._drop, forwarded)  # not what came from the Orthanc itself
        if forwarded:
            log.info("gateway: forwarded %d instance(s) to %s", len(forwarded), self.name)

    async def _check_reachable(self) -> None:
        await self.orthanc.client.request("GET", "/system", what="system of the gateway's Orthanc",
                                          max_body=LISTING_ANSWER, retries=0)

    def _drop(self, instance_ids: list[str]) -> None:
        for instance in instance_ids:
            try:
                self.store.delete(Level.INSTANCE, instance)
            except UnknownResource:
                pass

    # -- taking from the Orthanc -------------------------------------------------------------

    async def ensure_local(self, resources: Iterable[Resource]) -> None:
        """Bring the instances of the named resources that our store lacks from the Orthanc
        (checked by MD5); a resource neither holds stays unknown, and the caller's lookup answers
        404 as usual. One listing request per resource when we hold everything already."""
        wanted: list[str] = []
        for resource in resources:  # the Orthanc may hold more of a study than we do
            wanted += await self._instances_of(resource.parsed_level, resource.id)
        if not wanted:
            return
        held = await self.local.md5s(wanted)
        theirs = await self.orthanc.md5s(i for i in wanted if i not in held)

        async def fetch(position: int) -> None:
            instance, md5 = items[position]
            data = await self.orthanc.read(instance)
            digest = await to_thread.run_sync(lambda: hashlib.md5(data).hexdigest())
            if digest != md5:
                raise NetworkProtocol(f"instance {instance} from {self.name} does not match its MD5")
            await self.local.write(instance, data)

        items = list(theirs.items())
        await run_pool(range(len(items)), self.settings.workers, fetch)
        if items:
            log.info("gateway: fetched %d instance(s) from %s", len(items), self.name)

    async def _instances_of(self, level: Level, public_id: str) -> list[str]:
        if level == Level.INSTANCE:
            return [public_id]
        response = await self.orthanc.client.request(
            "GET", f"/{_LISTING[level]}/{public_id}/instances", accept_statuses=(404,),
            what=f"instances of {level.title.lower()} {public_id}", max_body=LISTING_ANSWER, expect_json=False)
        if response.status_code == 404:
            return []
        try:
            return [str(item["ID"]) for item in orjson.loads(response.content)]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise NetworkProtocol(f"{self.name}: malformed list of instances") from None

    # -- what it holds -----------------------------------------------------------------------

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        return await self.orthanc.entries(selection)

    async def md5s(self, instance_ids: Iterable[str], *, settled: bool) -> dict[str, str]:
        """What the Orthanc holds; unless `settled`, also what we hold and will forward."""
        wanted = list(dict.fromkeys(instance_ids))
        found = await self.orthanc.md5s(wanted)
        if not settled:
            ours = await self.local.md5s(i for i in wanted if i not in found)
            found.update(ours)
        return found
