"""The JSON shapes Orthanc answers for patients, studies, series and instances.

Kept apart from the routes because several routes (GET /{level}/{id}, ?expand lists, children
lists) answer the same shapes. Blocking: call from a worker thread.
"""

from __future__ import annotations

import calendar
import logging
import re
import time
from typing import Any

from accelerator.store import Resource, Store
from accelerator.store.dicom import (
    PATIENT_TAGS, keyword_of, parse_file, parse_stream, patient_tags_of_study, read_tag, study_tags,
)
from protocol.errors import AcceleratorError
from protocol.resources import Level

log = logging.getLogger(__name__)

STABLE_AGE_SECONDS = 60  # Orthanc's default StableAge

_COUNTERS = {
    "NumberOfPatientRelatedStudies": (Level.PATIENT, Level.STUDY),
    "NumberOfPatientRelatedSeries": (Level.PATIENT, Level.SERIES),
    "NumberOfPatientRelatedInstances": (Level.PATIENT, Level.INSTANCE),
    "NumberOfStudyRelatedSeries": (Level.STUDY, Level.SERIES),
    "NumberOfStudyRelatedInstances": (Level.STUDY, Level.INSTANCE),
    "NumberOfSeriesRelatedInstances": (Level.SERIES, Level.INSTANCE),
}


def resource_json(store: Store, resource: Resource, requested_tags: list[str] | None = None) -> dict[str, Any]:
    index = store.index
    level = resource.level
    answer: dict[str, Any] = {
        "ID": resource.public_id,
        "Type": resource.level.title,
        "MainDicomTags": study_tags(resource.main_tags) if level == Level.STUDY else resource.main_tags,
        "Labels": index.labels(resource),
    }
    if level != Level.INSTANCE:
        answer["IsStable"] = _is_stable(resource.last_update)
        answer["LastUpdate"] = resource.last_update
        answer[Level(level + 1).plural.capitalize()] = index.children(resource)
    if level == Level.STUDY:
        answer["ParentPatient"] = resource.parent
        answer["PatientMainDicomTags"] = patient_main_tags(store, resource)
    elif level == Level.SERIES:
        answer["ParentStudy"] = resource.parent
        expected = expected_number_of_instances(resource.main_tags)
        answer["ExpectedNumberOfInstances"] = expected
        answer["Status"] = "Unknown" if expected is None else series_status(store, resource, expected)
    elif level == Level.INSTANCE:
        attachment = index.attachment(resource.public_id)
        index_in_series = index.metadata(resource).get("IndexInSeries")
        answer["ParentSeries"] = resource.parent
        answer["FileSize"] = attachment.size
        answer["FileUuid"] = attachment.uuid
        answer["IndexInSeries"] = int(index_in_series) if index_in_series else None
    if requested_tags is not None:
        answer["RequestedTags"] = requested_tags_json(store, resource, requested_tags)
    return answer


def patient_main_tags(store: Store, study: Resource) -> dict[str, str]:
    """`PatientMainDicomTags` of a study: the patient tags of the study's own instances, kept at
    the study level at ingest as Orthanc does (not the patient's, which come from whichever study
    of that PatientID arrived first). A study indexed before they were kept there, or whose files
    hold none of them, reads them from one of its instance files."""
    tags = patient_tags_of_study(study.main_tags)
    if tags:
        return tags
    instances = store.index.descendants(study, Level.INSTANCE)
    if instances:
        try:
            attachment = store.attachment(instances[0])
            source = store.area.open_dicom(attachment.uuid, attachment.compressed)
            parsed = parse_stream(source) if hasattr(source, "read") else parse_file(source)
            return {k: v for k, v in parsed.tags[Level.PATIENT].items() if k in PATIENT_TAGS}
        except (OSError, AcceleratorError) as exc:
            log.warning("patient tags of study %s: %s", study.public_id, exc)
    return store.resource(Level.PATIENT, study.parent).main_tags


_LEXICAL_INT = re.compile(r"[+-]?[0-9]+")


def _lexical_int(text: str) -> int | None:
    """`boost::lexical_cast<int64_t>`: an optional sign and digits, nothing else."""
    if not _LEXICAL_INT.fullmatch(text):
        return None
    value = int(text)
    return value if -(1 << 63) <= value < (1 << 63) else None


def expected_number_of_instances(series_tags: dict[str, str]) -> int | None:
    """Orthanc's `ComputeExpectedNumberOfInstances` (StatelessDatabaseOperations::Store), on the
    series' main tags, which come from its first instance as Orthanc's metadata does: the first
    rule whose tags are both present decides, and a value that is not an integer or a product
    <= 0 means "unknown" (the next rules are not tried)."""
    for first, second in (("ImagesInAcquisition", "NumberOfTemporalPositions"),
                          ("NumberOfSlices", "NumberOfTimeSlices"),
                          ("CardiacNumberOfImages", None)):
        if first not in series_tags or (second is not None and second not in series_tags):
            continue
        a = _lexical_int(series_tags[first])
        b = 1 if second is None else _lexical_int(series_tags[second])
        if a is None or b is None:
            return None
        return a * b if a * b > 0 else None
    return None


def _parse_int64(text: str) -> int | None:
    """`SerializationToolbox::ParseInteger64`: spaces stripped, an optional '-', digits."""
    text = text.strip()
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() else None


def series_status(store: Store, series: Resource, expected: int) -> str:
    """Orthanc's `GetSeriesStatus`: the IndexInSeries of the instances (InstanceNumber, else
    ImageIndex) against the expected count: Unknown, Inconsistent, Missing or Complete."""
    seen: set[int] = set()
    for instance_id in store.index.children(series):
        tags = store.resource(Level.INSTANCE, instance_id).main_tags
        value = tags["InstanceNumber"] if "InstanceNumber" in tags else tags.get("ImageIndex")
        if value is None:
            continue  # no IndexInSeries metadata: not counted
        index = _parse_int64(value)
        if index is None:
            return "Unknown"
        if not 0 < index <= expected or index in seen:
            return "Inconsistent"
        seen.add(index)
    return "Complete" if len(seen) == expected else "Missing"


def requested_tags_json(store: Store, resource: Resource, names: list[str]) -> dict[str, str]:
    """Values of `requested-tags`: counters, main tags of the resource and its ancestors, else
    the tag as read from one of its instance files."""
    index = store.index
    inherited: dict[str, str] = {}
    current: Resource | None = resource
    while current is not None:
        for key, value in current.main_tags.items():
            inherited.setdefault(key, value)
        current = store.resource(Level(current.level - 1), current.parent) if current.parent else None
    answer = {}
    for name in names:
        keyword = keyword_of(name)
        if keyword in _COUNTERS and _COUNTERS[keyword][0] == resource.level:
            answer[keyword] = str(index.count_descendants(resource, _COUNTERS[keyword][1]))
        elif keyword == "ModalitiesInStudy" and resource.level == Level.STUDY:
            modalities = {store.resource(Level.SERIES, s).main_tags.get("Modality", "")
                          for s in index.children(resource)}
            answer[keyword] = "\\".join(sorted(m for m in modalities if m))
        elif keyword in inherited:
            answer[keyword] = inherited[keyword]
        else:
            value = _from_file(store, resource, name)
            if value is not None:
                answer[keyword] = value
    return answer


def _from_file(store: Store, resource: Resource, name: str) -> str | None:
    instances = store.index.descendants(resource, Level.INSTANCE)
    if not instances:
        return None
    attachment = store.attachment(instances[0])
    return read_tag(store.area.open_dicom(attachment.uuid, attachment.compressed), name)


def _is_stable(last_update: str) -> bool:
    try:
        updated = calendar.timegm(time.strptime(last_update, "%Y%m%dT%H%M%S"))
    except ValueError:
        return False
    return time.time() - updated > STABLE_AGE_SECONDS
