"""The JSON shapes Orthanc answers for patients, studies, series and instances.

Kept apart from the routes because several routes (GET /{level}/{id}, ?expand lists, children
lists) answer the same shapes. Blocking: call from a worker thread.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from accelerator.store import Resource, Store
from accelerator.store.dicom import keyword_of, read_tag
from protocol.resources import Level

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
    answer: dict[str, Any] = {
        "ID": resource.public_id,
        "Type": resource.level.title,
        "MainDicomTags": resource.main_tags,
        "Labels": index.labels(resource),
    }
    level = resource.level
    if level != Level.INSTANCE:
        answer["IsStable"] = _is_stable(resource.last_update)
        answer["LastUpdate"] = resource.last_update
        answer[Level(level + 1).plural.capitalize()] = index.children(resource)
    if level == Level.STUDY:
        answer["ParentPatient"] = resource.parent
        answer["PatientMainDicomTags"] = store.resource(Level.PATIENT, resource.parent).main_tags
    elif level == Level.SERIES:
        answer["ParentStudy"] = resource.parent
        answer["ExpectedNumberOfInstances"] = None
        answer["Status"] = "Unknown"
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
