"""Read what the index needs from a DICOM file: identifiers, main tags, a few metadata.

Values are taken from the raw element bytes as Orthanc's `FromDcmtkBridge::ConvertLeafElement`
takes them, so that main tags keep their original text ("1.0000\\0.0000", not a float) and IDs
are hashed from exactly the strings Orthanc hashes (spec 14):

- a string VR (CS, DS, LO, PN, UI...) loses its trailing padding and is decoded with the file's
  SpecificCharacterSet (Latin-1 without one, Orthanc's default encoding);
- a binary number (US, SS, UL, SL, FL, FD) is printed as a number, never through the character
  set (FL/FD with 9/17 significant digits, as `boost::lexical_cast`);
- an element written with VR UN is kept as Orthanc keeps it (DICOM CP 246): when the dictionary
  gives the tag a string VR, its bytes less one trailing NUL, decoded with the character set
  (a private tag only when it is plain ASCII), trailing spaces included; otherwise it is binary,
  and a binary value is never a main tag (Orthanc's `ResourcesContent` skips it);
- AT is "gggg,eeee"; other binary VRs (OB, OW, UN...) and sequences have no value.

As in Orthanc's `ResourcesContent::AddResource`, the patient's main tags are also kept at the
study level ("duplicate the patient tags at the study level"), so that a study reports the
patient tags of its own instances even when several studies share one (empty) PatientID.
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

from accelerator.store.dicom_scan import Header, scan_header
from protocol.errors import BadFileFormat, InexistentTag
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
PATIENT_TAGS = frozenset(MAIN_TAGS[Level.PATIENT])

_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                         "TM", "UC", "UI", "UR", "UT"})
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


def parse_stream(stream: BinaryIO) -> ParsedInstance:
    """A stored file opened for reading (only its header is read)."""
    return _parse(stream, 0)


def study_tags(tags: dict[str, str]) -> dict[str, str]:
    """The study's own main tags out of the study-level JSON (which also holds the patient's)."""
    return {k: v for k, v in tags.items() if k not in PATIENT_TAGS}


def patient_tags_of_study(tags: dict[str, str]) -> dict[str, str]:
    """The patient tags kept at the study level (Orthanc's `PatientMainDicomTags`)."""
    return {k: v for k, v in tags.items() if k in PATIENT_TAGS}


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


_UID_TAGS = (("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E),
             ("SOPInstanceUID", 0x00080018))
# Every tag `_parse` looks at: what the fast scanner keeps.
_PARSED_TAGS = frozenset(
    {tag_for_keyword(kw) for names in MAIN_TAGS.values() for kw in names}
    | {tag for _, tag in _UID_TAGS}
    | {0x00100020, 0x00080016, 0x00080005, 0x00280103}  # PatientID, SOPClassUID, charset, PixelRepresentation
)


def _parse_with_pydicom(stream: BinaryIO, size: int) -> ParsedInstance:
    """`_parse` without the fast scanner: the reference it must agree with."""
    return _parse(stream, size, fast=False)


def _parse(stream: BinaryIO, size: int, *, fast: bool = True) -> ParsedInstance:
    try:
        # The fast scanner reads ordinary files (pydicom costs ~0.5 ms a file); pydicom reads,
        # and judges, anything else.
        ds = scan_header(stream, _LAST_MAIN_TAG, _PARSED_TAGS) if fast else None
        if ds is None:
            ds = read_partial(stream, stop_when=_past_main_tags, force=True)
        encodings = _encodings(ds)
        values = {
            level: {kw: v for kw in names if (v := _value(ds, tag_for_keyword(kw), encodings)) is not None}
            for level, names in MAIN_TAGS.items()
        }
        absent = [kw for kw, tag in _UID_TAGS if ds.get_item(tag) is None]
        uids = [_value(ds, tag, encodings) for _, tag in _UID_TAGS]
        patient_id = _value(ds, 0x00100020, encodings) or ""
        sop_class = _value(ds, 0x00080016, encodings) or ""
        transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    except BadFileFormat:
        raise
    except Exception as exc:  # pydicom raises many types on garbage input
        raise BadFileFormat(f"Cannot parse an invalid DICOM file (size: {size} bytes)") from exc
    if len(absent) == len(_UID_TAGS):  # nothing of an instance: not DICOM at all
        raise BadFileFormat(f"Cannot parse an invalid DICOM file (size: {size} bytes)")
    if absent:  # Orthanc: DicomMap::GetValue in DicomInstanceHasher -> ErrorCode_InexistentTag
        raise InexistentTag(f"Missing tag(s) {', '.join(absent)} (size: {size} bytes)")
    if not all(uids):  # present but empty: DicomInstanceHasher::Setup
        raise BadFileFormat("missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    values[Level.STUDY] = {**values[Level.PATIENT], **values[Level.STUDY]}
    number = values[Level.INSTANCE].get("InstanceNumber") or values[Level.INSTANCE].get("ImageIndex")
    return ParsedInstance(
        ids=resource_ids(patient_id, *uids),  # type: ignore[arg-type]
        tags=values,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        index_in_series=_to_int(number),
    )


def _encodings(ds: pydicom.Dataset | Header) -> list[str]:
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


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown: DCMTK reads it as UN
        return "UN"


def _value(ds: pydicom.Dataset | Header, tag: int | None, encodings: list[str]) -> str | None:
    """The element as Orthanc's ConvertLeafElement renders it; None for absent or binary."""
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
    vr = elem.VR or _dictionary_vr(tag)  # implicit VR: the dictionary's, as DCMTK
    if vr == "UN":
        return _unknown_vr(tag, raw, encodings)
    if vr == "US or SS":  # implicit VR: DCMTK decides by PixelRepresentation
        vr = "SS" if _pixel_representation(ds) == 1 else "US"
    if vr in _STRING_VRS:
        return strip_padding(_decode(raw, vr, encodings))
    if vr in _BINARY_FORMATS:
        return _numbers(raw, vr, elem.is_little_endian)
    if vr == "AT" and len(raw) >= 4:
        group, element = struct.unpack("<HH" if elem.is_little_endian else ">HH", raw[:4])
        return f"{group:04x},{element:04x}"
    return None  # OB, OW, OF, SQ, ...: binary, never a main tag


def _unknown_vr(tag: int, raw: bytes, encodings: list[str]) -> str | None:
    """An element written with VR UN (DICOM CP 246), kept as Orthanc keeps it."""
    private = (tag >> 16) % 2 == 1
    if not private and _dictionary_vr(tag) not in _STRING_VRS:
        return None  # e.g. US written as UN: binary for Orthanc, so no main tag
    if raw and len(raw) % 2 == 0 and raw[-1] == 0:
        raw = raw[:-1]  # only the trailing NUL padding goes; trailing spaces stay
    if private:  # only a plain ASCII private value is a string
        return raw.decode("ascii") if all(b < 128 for b in raw) else None
    return _decode(raw, _dictionary_vr(tag), encodings)


def _decode(raw: bytes, vr: str, encodings: list[str]) -> str:
    """Bytes of a string VR through the character set (Orthanc's Toolbox::ConvertToUtf8)."""
    return decode_bytes(raw, encodings, _TEXT_DELIMITERS.get(vr, {0x5C}))


def _numbers(raw: bytes, vr: str, little_endian: bool) -> str:
    fmt = _BINARY_FORMATS[vr]
    width = struct.calcsize(f"<{fmt}")  # standard sizes: native "l" would be 8 bytes here
    count = len(raw) // width
    numbers = struct.unpack(f"{'<' if little_endian else '>'}{count}{fmt}", raw[: count * width])
    if vr == "FL":  # boost::lexical_cast<std::string>: max_digits10 significant digits
        return "\\".join(f"{n:.9g}" for n in numbers)
    if vr == "FD":
        return "\\".join(f"{n:.17g}" for n in numbers)
    return "\\".join(str(n) for n in numbers)


def _pixel_representation(ds: pydicom.Dataset | Header) -> int:
    elem = ds.get_item(0x00280103)
    if isinstance(elem, RawDataElement) and elem.value and len(elem.value) >= 2:
        return struct.unpack("<H" if elem.is_little_endian else ">H", elem.value[:2])[0]
    return 0


def _to_int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text.split("\\")[0].strip())
    except ValueError:
        return None
