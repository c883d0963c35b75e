"""This daemon's own store as a replication end: sizes and MD5s from the index (computed once at
ingest), so listing and checking never read a DICOM file."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from anyio import to_thread

from accelerator.replication.ends import InstanceEntry, Selection
from accelerator.store import Store
from accelerator.store.index import NEW_INSTANCE
from protocol.errors import ParameterOutOfRange, UnknownResource
from protocol.resources import Level


def find_studies(store: Store, selection: Selection) -> list[str]:
    """The studies a plain Orthanc's study-level `/tools/find` gives for the selection: the
    same syntax, checks and matching (the API's own code; imported here, not at the top, as
    the API package imports this module)."""
    from accelerator.api.find import parse_find, run_find

    return run_find(store, parse_find(orjson.dumps({"Level": "Study", "Query": selection.to_json()})))


class LocalStore:
    """Source and target: the store of this daemon."""

    name = "this daemon"

    def __init__(self, store: Store):
        self.store = store

    async def aclose(self) -> None:
        """The store belongs to the daemon."""

    def _entries(self, selection: Selection) -> list[InstanceEntry]:
        index = self.store.index
        entries = []
        for study_id in find_studies(self.store, selection):
            try:
                study = index.resource(Level.STUDY, study_id)
                for series_id in index.children(study):
                    series = index.resource(Level.SERIES, series_id)
                    for item in index.instance_files(Level.SERIES, series_id):
                        att = item.attachment
                        entries.append(InstanceEntry(item.instance_id, att.size, att.md5, study.parent or "",
                                                     study_id, series.public_id))
            except UnknownResource:
                continue  # deleted while listed: not copied
        return sorted(entries, key=lambda e: e.id)

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        return await to_thread.run_sync(self._entries, selection)

    async def read(self, instance_id: str) -> bytes:
        return await to_thread.run_sync(self.store.read_file, instance_id)

    def _md5s(self, instance_ids: Iterable[str]) -> dict[str, str]:
        found = {}
        for instance in instance_ids:
            try:
                found[instance] = self.store.attachment(instance).md5
            except UnknownResource:
                pass
        return found

    async def md5s(self, instance_ids: Iterable[str], *, settled: bool = False) -> dict[str, str]:
        """What our store holds (`settled` changes nothing: what it holds, it holds for good)."""
        return await to_thread.run_sync(self._md5s, list(instance_ids))

    async def write(self, instance_id: str, data: bytes) -> None:
        outcome = await to_thread.run_sync(lambda: self.store.ingest_bytes(data, origin="Plugins"))
        if outcome.parsed.ids.instance != instance_id:
            raise ParameterOutOfRange(f"the file sent as instance {instance_id} is instance "
                                      f"{outcome.parsed.ids.instance}")

    def _census(self, study_ids: list[str]) -> dict[str, tuple[int, int]]:
        index = self.store.index
        found = {}
        for study_id in study_ids:
            try:
                study = index.resource(Level.STUDY, study_id)
            except UnknownResource:
                continue
            found[study_id] = (index.count_descendants(study, Level.SERIES),
                               index.count_descendants(study, Level.INSTANCE))
        return found

    async def census(self, study_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        return await to_thread.run_sync(self._census, list(dict.fromkeys(study_ids)))

    def _changes(self, since: int | None) -> tuple[int, int]:
        index = self.store.index
        if since is None:
            return 0, index.last_change_seq()
        entries, _, last = index.changes(since, 1000)
        return sum(1 for c in entries if c.change_type == NEW_INSTANCE), last

    async def changes(self, since: int | None) -> tuple[int, int]:
        """(new instances after `since`, last sequence number) of our changes log."""
        return await to_thread.run_sync(self._changes, since)
