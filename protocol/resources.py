"""Resource levels and Orthanc public identifiers (spec sections 4.1 and 14).

An Orthanc ID is the SHA-1 of the DICOM identifiers of a resource and of its ancestors, so two
servers that store the same file agree on every ID without talking to each other.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import NamedTuple

from protocol.errors import ParameterOutOfRange

ID_PATTERN = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3

    @property
    def title(self) -> str:
        """'Patient', 'Study', ... as in the `Type` field of Orthanc answers."""
        return self.name.capitalize()

    @property
    def plural(self) -> str:
        """'patients', 'studies', ... as in REST paths."""
        return _PLURALS[self]

    @classmethod
    def parse(cls, text: str) -> "Level":
        """Case-insensitive, with the aliases Orthanc accepts (`Studies`, `Image`, ...)."""
        level = _ALIASES.get(text.lower()) if isinstance(text, str) else None
        if level is None:
            raise ParameterOutOfRange(f"Unknown resource level: {text!r}")
        return level


_PLURALS = {
    Level.PATIENT: "patients",
    Level.STUDY: "studies",
    Level.SERIES: "series",
    Level.INSTANCE: "instances",
}

_ALIASES = {
    "patient": Level.PATIENT,
    "patients": Level.PATIENT,
    "study": Level.STUDY,
    "studies": Level.STUDY,
    "series": Level.SERIES,
    "instance": Level.INSTANCE,
    "instances": Level.INSTANCE,
    "image": Level.INSTANCE,
    "images": Level.INSTANCE,
}


class ResourceIds(NamedTuple):
    patient: str
    study: str
    series: str
    instance: str


def strip_padding(value: str) -> str:
    """Remove the trailing spaces and NULs DICOM pads values with; leading spaces are kept."""
    return value.rstrip(" \x00")


def orthanc_id(*parts: str) -> str:
    """SHA-1 of the `|`-joined UTF-8 parts, as five dash-separated groups of 8 hex digits."""
    digest = hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def resource_ids(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> ResourceIds:
    """The four Orthanc IDs of an instance, from already decoded DICOM values."""
    p, st, se, sop = (strip_padding(v) for v in (patient_id, study_uid, series_uid, sop_uid))
    return ResourceIds(
        patient=orthanc_id(p),
        study=orthanc_id(p, st),
        series=orthanc_id(p, st, se),
        instance=orthanc_id(p, st, se, sop),
    )


def is_orthanc_id(text: str) -> bool:
    return bool(ID_PATTERN.match(text))
