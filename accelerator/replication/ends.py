"""What a replication copies, and the two ends it copies between.

An end is where instances are read (a source) or written (a target): a plain Orthanc through its
REST API, an Orthanc storage folder read directly (source only), this daemon's own store, or a
peer that speaks the transfers protocol. Each is one implementation of `Source` or `Target`.
Instances are named by their Orthanc ID, which every Orthanc computes the same way from the
DICOM UIDs, so the same instance has the same ID at both ends and the target can be asked, by ID,
for the MD5 of what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class InstanceEntry:
    """One instance of a source: its Orthanc ID, the size and MD5 of its DICOM file, and the
    Orthanc IDs of its parents (for the counts per level of the final check)."""

    id: str
    size: int
    md5: str
    patient: str
    study: str
    series: str

    def to_json(self) -> dict[str, Any]:
        return {"ID": self.id, "Size": self.size, "MD5": self.md5, "Patient": self.patient,
                "Study": self.study, "Series": self.series}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> InstanceEntry:
        return cls(item["ID"], int(item["Size"]), item["MD5"], item["Patient"], item["Study"], item["Series"])


@dataclass(frozen=True)
class Selection:
    """Which studies to copy, as one study-level query in the syntax of Orthanc's `/tools/find`
    (`Query`: keyword -> value, with `*`/`?` wildcards, `\\`-separated lists and date ranges;
    patient-level tags such as PatientID are allowed). Empty: everything."""

    query: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, *, patients: Sequence[str] = (), studies: Sequence[str] = (), since: str | None = None,
           query: dict[str, str] | None = None) -> Selection:
        """`--patient` (PatientID values), `--study` (StudyInstanceUID values), `--since`
        (a StudyDate YYYYMMDD: that day and later) and `--query` (more constraints)."""
        combined = dict(query or {})
        if patients:
            combined["PatientID"] = "\\".join(patients)
        if studies:
            combined["StudyInstanceUID"] = "\\".join(studies)
        if since:
            combined["StudyDate"] = f"{since}-"
        return cls(combined)

    @property
    def everything(self) -> bool:
        return not self.query

    def to_json(self) -> dict[str, str]:
        return dict(self.query)


class Source(Protocol):
    """Where a replication reads."""

    name: str

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        """Every instance of the selected studies, sorted by ID."""

    async def read(self, instance_id: str) -> bytes:
        """The instance's DICOM file, checked against its MD5; `UnknownResource` when it is gone."""

    async def aclose(self) -> None: ...


class Target(Protocol):
    """Where a replication writes."""

    name: str

    async def md5s(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """The MD5 of the DICOM file the target holds, for those of the instances it holds."""

    async def write(self, instance_id: str, data: bytes) -> None:
        """Store one instance; an `OrthancError` says why the target refused it."""

    async def aclose(self) -> None: ...
