"""Read what the index needs from a DICOM file: identifiers, main tags, a few metadata.

Values are taken from the raw element bytes and decoded with the file's SpecificCharacterSet, so
that main tags keep their original text ("1.0000\\0.0000", not a float) and IDs are hashed from
exactly the strings Orthanc hashes (spec 14).
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_partial

from protocol.errors import BadFileFormat
from protocol.resources import Level, ResourceIds, resource_ids, strip_padding

# Orthanc's default main DICOM tags per level (what /patients/{id} etc. report).
MAIN_TAGS: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs"),
    Level.STUDY: (
        "StudyDate", "StudyTime", "StudyID", "StudyDescription", "AccessionNumber",
        "StudyInstanceUID", "RequestedProcedureDescription", "InstitutionName",
        "RequestingPhysician", "ReferringPhysicianName",
    ),
    Level.SERIES: (
        "SeriesDate", "SeriesTime", "Modality", "Manufacturer", "StationName",
        "SeriesDescription", "BodyPartExamined", "SequenceName", "ProtocolName", "SeriesNumber",
        "CardiacNumberOfImages", "ImagesInAcquisition", "NumberOfTemporalPositions",
        "NumberOfSlices", "NumberOfTimeSlices", "SeriesInstanceUID", "ImageOrientationPatient",
        "SeriesType", "OperatorsName", "PerformedProcedureStepDescription",
        "AcquisitionDeviceProcessingDescription", "ContrastBolusAgent",
    ),
    Level.INSTANCE: (
        "InstanceCreationDate", "InstanceCreationTime", "AcquisitionNumber", "ImageIndex",
        "InstanceNumber", "NumberOfFrames", "TemporalPositionIdentifier", "SOPInstanceUID",
        "ImagePositionPatient", "ImageComments", "ImageOrientationPatient",
    ),
}

_TEXT_DELIMITERS = {
    "PN": {0x5C, 0x5E, 0x3D},
    "SH": {0x5C},
    "LO": {0x5C},
    "UC": {0x5C},
    "ST": {0x0D, 0x0A, 0x09, 0x0C},
    "LT": {0x0D, 0x0A, 0x09, 0x0C},
    "UT": {0x0D, 0x0A, 0x09, 0x0C},
}
_LAST_MAIN_TAG = max(tag_for_keyword(kw) for names in MAIN_TAGS.values() for kw in names)


def _past_main_tags(tag, vr, length) -> bool:
    """Stop reading a header after the last tag ingest needs (private groups and pixel data
    after it are never parsed)."""
    return tag > _LAST_MAIN_TAG


_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}


@dataclass(frozen=True)
class ParsedInstance:
    """Everything ingest needs to know about one DICOM file, read once."""

    ids: ResourceIds
    tags: dict[Level, dict[str, str]]
    sop_class_uid: str
    transfer_syntax_uid: str
    index_in_series: int | None
    extra: dict[str, str] = field(default_factory=dict)


def parse_bytes(data: bytes) -> ParsedInstance:
    return _parse(io.BytesIO(data), len(data))


def parse_file(path: str | os.PathLike) -> ParsedInstance:
    with open(path, "rb") as f:
        return _parse(f, os.fstat(f.fileno()).st_size)


def read_tag(source: str | os.PathLike | BinaryIO, name: str) -> str | None:
    """One tag (keyword or 'gggg,eeee') of a stored file, decoded like main tags; None if absent."""
    ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    tag = _tag_of(name)
    return None if tag is None else _value(ds, tag, _encodings(ds))


def _tag_of(name: str) -> int | None:
    if "," in name:
        group, _, element = name.partition(",")
        try:
            return (int(group, 16) << 16) | int(element, 16)
        except ValueError:
            return None
    return tag_for_keyword(name)


def keyword_of(name: str) -> str:
    """The keyword for a requested tag given as keyword or 'gggg,eeee' (unknown: as given)."""
    tag = _tag_of(name)
    return (keyword_for_tag(tag) or name) if tag is not None else name


def _parse(stream: BinaryIO, size: int) -> ParsedInstance:
    try:
        ds = read_partial(stream, stop_when=_past_main_tags, force=True)
        encodings = _encodings(ds)
        values = {
            level: {kw: v for kw in names if (v := _value(ds, tag_for_keyword(kw), encodings)) is not None}
            for level, names in MAIN_TAGS.items()
        }
        uids = [_value(ds, tag_for_keyword(kw), encodings) for kw in
                ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        patient_id = _value(ds, 0x00100020, encodings) or ""
        sop_class = _value(ds, 0x00080016, encodings) or ""
        transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    except BadFileFormat:
        raise
    except Exception as exc:  # pydicom raises many types on garbage input
        raise BadFileFormat(f"Cannot parse an invalid DICOM file (size: {size} bytes)") from exc
    missing = [kw for kw, uid in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), uids)
               if not uid]
    if len(missing) == 3:
        raise BadFileFormat(f"Cannot parse an invalid DICOM file (size: {size} bytes)")
    if missing:
        raise BadFileFormat(f"Missing mandatory tag(s): {', '.join(missing)} (size: {size} bytes)")
    number = values[Level.INSTANCE].get("InstanceNumber") or values[Level.INSTANCE].get("ImageIndex")
    return ParsedInstance(
        ids=resource_ids(patient_id, *uids),  # type: ignore[arg-type]
        tags=values,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        index_in_series=_to_int(number),
    )


def _encodings(ds: pydicom.Dataset) -> list[str]:
    raw = ds.get_item(0x00080005)
    if raw is None:
        return convert_encodings(None)
    value = raw.value if isinstance(raw, RawDataElement) else raw.value
    if isinstance(value, bytes):
        value = [v.strip() for v in value.decode("ascii", "replace").split("\\")]
    try:
        return convert_encodings(value or None)
    except Exception:
        return convert_encodings(None)


def _value(ds: pydicom.Dataset, tag: int | None, encodings: list[str]) -> str | None:
    if tag is None:
        return None
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):  # already converted by pydicom (e.g. file meta)
        value = elem.value
        if value is None:
            return ""
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)
        return strip_padding(str(value))
    raw: bytes = elem.value or b""
    vr = elem.VR or dictionary_VR(tag)
    if vr == "SQ":
        return None
    if vr in _BINARY_FORMATS:
        fmt = _BINARY_FORMATS[vr]
        width = struct.calcsize(fmt)
        order = "<" if elem.is_little_endian else ">"
        count = len(raw) // width
        numbers = struct.unpack(f"{order}{count}{fmt}", raw[: count * width])
        return "\\".join(str(n) for n in numbers)
    if vr in _TEXT_DELIMITERS:
        text = decode_bytes(raw, encodings, _TEXT_DELIMITERS[vr])
    else:
        text = raw.decode("latin-1")
    return strip_padding(text)


def _to_int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text.split("\\")[0].strip())
    except ValueError:
        return None
