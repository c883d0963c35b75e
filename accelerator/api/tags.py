"""Routes of the Orthanc REST API: the DICOM tags of instances, as Orthanc 1.12 shows them.

Checked against Orthanc's source (OrthancRestResources.cpp, FromDcmtkBridge.cpp,
ParsedDicomFile.cpp, ServerContext.cpp, Toolbox.cpp):

- `GET /instances/{id}/tags`: the dataset in the "full" format, `{"0010,0010": {"Name",
  "Type", "Value"}}` (`FromDcmtkBridge::DatasetToJson` with `DicomToJsonFlags_Default`): private
  and unknown tags included (a private data element also gets its "PrivateCreator"), group
  lengths left out, a binary value (OB, OW, UN without a string VR in the dictionary...) is
  `"Type": "Null"`, a string longer than 256 bytes (`ORTHANC_MAXIMUM_TAG_LENGTH`) is
  `"Type": "TooLong"` with a null value unless listed in `?ignore-length=` (comma-separated), a
  sequence is `"Type": "Sequence"` with a list of items; the dataset stops after PixelData
  (itself `Null`) unless `?whole` (1.12.4). `?simplify` gives `{Name: value}` and `?short`
  `{"gggg,eeee": value}` (`Toolbox::SimplifyDicomAsJson`: Null and TooLong become null, Binary
  is dropped); only the presence of the argument counts (`OrthancRestApi::GetDicomFormat`).
  Values are rendered exactly as the main DICOM tags are (`accelerator.store.dicom._value`:
  padding removed, text through the file's SpecificCharacterSet, numbers never through it).
- `/simplified-tags`: `/tags?simplify`.
- `/header`: the meta header (`HeaderToJson`, `DicomToJsonFlags_None`: no binary, private or
  unknown element, group length kept, no length limit), same `?simplify`/`?short`.
- `/content/{path}`: raw access (`ParsedDicomFile::SendPathValue`): an even path (empty, or
  `tag/index` pairs into sequences) lists the tags of that dataset as "gggg-eeee"; a sequence
  lists its item indices as strings; another element answers its raw value bytes
  (application/octet-stream, little-endian numbers); `7fe0-0010` lists the pixel data
  fragments (`["0"]` when not encapsulated) and `7fe0-0010/{n}` answers one. Where Orthanc's
  handler answers nothing (absent tag, index out of range or not a number), its REST layer sends
  a bare 404: so do we.
- `/{patients|studies|series}/{id}/shared-tags`: the top-level `String` tags whose value is the
  same in every child instance (`ExtractSharedTags`), full format unless `?simplify`/`?short`.
- `/{level}/{id}/statistics`: `GetResourceStatistics`, sizes as strings, MB floored, counts of
  the levels below.
- `/{level}/{id}/attachments`: `["dicom"]` for an instance, `[]` above; `?full` gives
  `{"dicom": 1}` (`ListAttachments`).

Orthanc looks resources up by ID whatever the level word of the URI for shared-tags and
statistics (`GetChildInstances`, `GetResourceStatistics`): so do we. A tag name Orthanc's
dictionary does not know is its `UnknownDicomTag` (27), which Orthanc answers with HTTP 500 (not
in its list of client errors); we answer it with 400, the name being the client's.
"""

from __future__ import annotations

import io
import re
import struct
from typing import Any, BinaryIO

import pydicom
from anyio import to_thread
from pydicom.datadict import dictionary_is_retired, dictionary_VR, get_private_entry, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api import core  # registers the {level:level} convertor
from accelerator.api.http import json_answer
from accelerator.store import Resource, Store
from accelerator.store.dicom import _encodings, _value  # the one rendering of values (main tags too)
from protocol.errors import BadFileFormat, ParameterOutOfRange, UnknownDicomTag, UnknownResource
from protocol.resources import Level

MAX_TAG_LENGTH = 256  # ORTHANC_MAXIMUM_TAG_LENGTH: longer strings are "TooLong"
UNKNOWN_NAME = "Unknown Tag & Data"  # DCMTK's DcmTag_ERROR_TagName
PIXEL_DATA = 0x7FE00010
MIB = 1024 * 1024

FULL, HUMAN, SHORT = "full", "human", "short"

_HEX_TAG = re.compile(r"[0-9A-Fa-f]{4}[,-]?[0-9A-Fa-f]{4}")
_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]+")
_BINARY_WIDTH = {"US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "AT": 2,
                 "FD": 8, "OD": 8, "OL": 4, "OV": 8, "SV": 8, "UV": 8}
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, PIXEL_DATA)
_ASCII = ["iso8859"]  # the header is read as ASCII (Orthanc: Encoding_Ascii)


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return f'"{text}"'


def parse_tag(name: Any) -> int:
    """`FromDcmtkBridge::ParseTag`: "gggg,eeee", "gggg-eeee", "ggggeeee" or a dictionary name
    (DCMTK's retired names carry "RETIRED_")."""
    if isinstance(name, str):
        if _HEX_TAG.fullmatch(name):
            return (int(name[:4], 16) << 16) | int(name[-4:], 16)
        tag = tag_for_keyword(name[8:] if name.startswith("RETIRED_") else name)
        if tag is not None:
            return tag
    raise UnknownDicomTag(f"Unknown DICOM tag: {_quote(name)}")


def format_tag(tag: int, separator: str = ",") -> str:
    return f"{tag >> 16:04x}{separator}{tag & 0xFFFF:04x}"


def tag_name(tag: int, creator: str | None = None) -> str:
    """DCMTK's name of a tag (`FromDcmtkBridge::GetTagName`)."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        if 0x0010 <= element <= 0x00FF:
            return "PrivateCreator"
        if creator:
            try:  # DCMTK's private dictionary names: the descriptions in CamelCase
                words = _NOT_ALNUM.split(get_private_entry(tag, creator)[2])
                name = "".join(w[:1].upper() + w[1:] for w in words)
            except KeyError:
                name = ""
            if name:
                return name
        return UNKNOWN_NAME
    keyword = keyword_for_tag(tag)
    if not keyword:
        return UNKNOWN_NAME
    try:
        return f"RETIRED_{keyword}" if dictionary_is_retired(tag) else keyword
    except KeyError:
        return keyword


def tag_vr(tag: int) -> str | None:
    """The dictionary's VR of a tag (what Orthanc's constraints are built on), None if unknown."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def bool_argument(request: Request, name: str) -> bool:
    """`GetBooleanArgument(name, false)`: absent false, present without value true."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw in ("", "true", "1"):
        return True
    if raw in ("false", "0"):
        return False
    raise ParameterOutOfRange(f"Expected a Boolean for argument {name!r}, but got: {raw!r}")


def dicom_format(request: Request, default: str) -> str:
    """`OrthancRestApi::GetDicomFormat`: the presence of `simplify`, `short` or `full`."""
    params = request.query_params
    if "simplify" in params:
        return HUMAN
    if "short" in params:
        return SHORT
    if "full" in params:
        return FULL
    return default


# -- the JSON of a dataset ---------------------------------------------------------------------

def _private_vr(tag: int, creator: str | None) -> str | None:
    if not creator:
        return None
    try:
        return get_private_entry(tag, creator)[0]
    except KeyError:
        return None


def _with_vr(elem: RawDataElement, vr: str, encodings: list[str]) -> str | None:
    """A raw element rendered as if it had `vr` (DCMTK reads an implicit-VR element with the
    VR of its dictionary entry)."""
    scratch = Dataset()
    scratch[elem.tag] = elem._replace(VR=vr)
    return _value(scratch, elem.tag, encodings)


def _is_ascii(raw: bytes) -> bool:
    return all(b < 128 and (b >= 32 or b in (0, 9, 10, 13)) for b in raw)


def _numbers(raw: bytes, vr: str, little_endian: bool) -> str | None:
    """`ApplyDcmtkToCTypeConverter`: every value when the length is a multiple of the width,
    else the first; FL/FD with max_digits10 significant digits (`boost::lexical_cast`); no value
    at all is null."""
    fmt = _NUMBER_FORMATS[vr]
    width = struct.calcsize("<" + fmt)
    if len(raw) < width:
        return None
    count = len(raw) // width if len(raw) % width == 0 else 1
    numbers = struct.unpack(f"{'<' if little_endian else '>'}{count}{fmt}", raw[: count * width])
    if vr == "FL":
        return "\\".join(f"{n:.9g}" for n in numbers)
    if vr == "FD":
        return "\\".join(f"{n:.17g}" for n in numbers)
    return "\\".join(str(n) for n in numbers)


def _pixel_representation(ds: Dataset) -> int:
    elem = ds.get_item(0x00280103)
    raw = elem.value if isinstance(elem, RawDataElement) else None
    if raw and len(raw) >= 2:
        return struct.unpack("<H" if elem.is_little_endian else ">H", raw[:2])[0]
    return 0


def leaf_value(ds: Dataset, tag: int, encodings: list[str], creator: str | None) -> str | None:
    """The string Orthanc shows for a leaf element (`ConvertLeafElement`), None for a null one
    (binary, unknown VR, no number)."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):  # converted by pydicom (SpecificCharacterSet...)
        return _value(ds, tag, encodings)
    group, element = tag >> 16, tag & 0xFFFF
    vr = elem.VR or tag_vr(tag)
    if group % 2 == 1 and element >= 0x0010:
        if element <= 0x00FF:  # a private creator: LO in DCMTK's dictionary
            vr = "LO" if elem.VR in (None, "UN") else elem.VR
        elif elem.VR is None:  # implicit VR: the private dictionary's VR, else unknown (null)
            vr = _private_vr(tag, creator)
            if vr is None or vr == "SQ":
                return None
        elif elem.VR == "UN":  # a string only if the dictionary says so and it is plain ASCII
            known = _private_vr(tag, creator)
            raw = elem.value or b""
            return raw.decode("ascii") if known in _STRING_VRS and _is_ascii(raw) else None
    elif elem.VR == "UN" or vr is None:
        return _value(ds, tag, encodings)  # the main tags' rule for UN (dictionary VR, CP 246)
    if vr == "US or SS":
        vr = "SS" if _pixel_representation(ds) == 1 else "US"
    if vr in _NUMBER_FORMATS:
        return _numbers(elem.value or b"", vr, elem.is_little_endian)
    return _value(ds, tag, encodings) if vr == elem.VR else _with_vr(elem, vr, encodings)


_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                         "TM", "UC", "UI", "UR", "UT"})
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def _vr_of(elem: Any, tag: int) -> str | None:
    return elem.VR or tag_vr(tag)


def _is_sequence(elem: Any, tag: int) -> bool:
    vr = _vr_of(elem, tag)
    if vr == "SQ":
        return True
    if isinstance(elem, RawDataElement) and elem.VR in (None, "UN") and tag != PIXEL_DATA:
        return elem.length == 0xFFFFFFFF  # undefined length: DCMTK and pydicom read a sequence
    return False


def _creators(ds: Dataset, encodings: list[str]) -> dict[tuple[int, int], str]:
    found = {}
    for tag in ds.keys():
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 == 1 and 0x0010 <= element <= 0x00FF:
            value = leaf_value(ds, tag, encodings, None)
            if value:
                found[(group, element)] = value
    return found


def dataset_json(ds: Dataset, encodings: list[str], *, ignore_length: frozenset[int] = frozenset(),
                 strings_only: bool = False, depth: int = 0) -> dict[str, Any]:
    """A dataset in Orthanc's full format. `strings_only`: only the top-level `String` tags
    (what shared-tags and find keep of a file)."""
    answer: dict[str, Any] = {}
    creators = _creators(ds, encodings)
    for tag in sorted(ds.keys()):
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0x0000:
            continue  # DicomToJsonFlags_SkipGroupLengths
        elem = ds.get_item(tag)
        creator = creators.get((group, element >> 8)) if group % 2 == 1 and element > 0x00FF else None
        name = tag_name(tag, creator)
        if _is_sequence(elem, tag):
            if strings_only:
                continue
            try:
                items = ds[tag].value or []
                value = [dataset_json(item, encodings, ignore_length=ignore_length, depth=depth + 1)
                         for item in items]
            except Exception:  # noqa: BLE001 - a sequence pydicom cannot parse: no value
                answer[format_tag(tag)] = {"Name": name, "Type": "Null", "Value": None}
                continue
            answer[format_tag(tag)] = {"Name": name, "Type": "Sequence", "Value": value}
            continue
        node: dict[str, Any] = {"Name": name}
        if creator:
            node["PrivateCreator"] = creator
        value = leaf_value(ds, tag, encodings, creator)
        if value is None:
            node["Type"], node["Value"] = "Null", None
        elif len(value.encode("utf-8")) > MAX_TAG_LENGTH and tag not in ignore_length:
            node["Type"], node["Value"] = "TooLong", None
        else:
            node["Type"], node["Value"] = "String", value
        if strings_only and node["Type"] != "String":
            continue
        answer[format_tag(tag)] = node
    return answer


def header_json(ds: Dataset) -> dict[str, Any]:
    """The meta header with `DicomToJsonFlags_None`: no binary, private or unknown element."""
    meta = ds.file_meta
    answer: dict[str, Any] = {}
    for tag in sorted(meta.keys()):
        elem = meta.get_item(tag)
        vr = _vr_of(elem, tag)
        if (tag >> 16) % 2 == 1 or tag_vr(tag) is None or vr in (None, "OB", "OW", "UN", "OB or OW"):
            continue
        value = leaf_value(meta, tag, _ASCII, None)  # no length limit in the header
        answer[format_tag(tag)] = {"Name": tag_name(tag), "Type": "Null" if value is None else "String",
                                   "Value": value}
    return answer


def simplify(full: dict[str, Any], fmt: str) -> dict[str, Any]:
    """`Toolbox::SimplifyDicomAsJson`."""
    answer: dict[str, Any] = {}
    for key in sorted(full):
        node = full[key]
        name = node["Name"] if fmt == HUMAN else key
        kind = node["Type"]
        if kind == "String":
            answer[name] = node["Value"]
        elif kind in ("TooLong", "Null"):
            answer[name] = None
        elif kind == "Sequence":
            answer[name] = [simplify(item, fmt) for item in node["Value"]]
    return answer


def formatted(full: dict[str, Any], fmt: str) -> dict[str, Any]:
    return full if fmt == FULL else simplify(full, fmt)


# -- reading stored files ----------------------------------------------------------------------

def read_dataset(source: bytes | BinaryIO, *, whole: bool = False) -> tuple[Dataset, int | None]:
    """The dataset of a stored file, read up to its pixel data unless `whole`; and the pixel
    tag it stopped at (Orthanc shows PixelData as a Null element then)."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(stream, force=True, stop_before_pixels=not whole)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise BadFileFormat(f"Cannot parse the stored DICOM file: {exc}") from exc
    if whole:
        return ds, None
    head = stream.read(4)
    if len(head) == 4:
        little = ds.is_little_endian if ds.is_little_endian is not None else True
        group, element = struct.unpack("<HH" if little else ">HH", head)
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            return ds, tag
    return ds, None


def instance_json(store: Store, instance_id: str, *, whole: bool = False,
                  ignore_length: frozenset[int] = frozenset(), strings_only: bool = False) -> dict[str, Any]:
    """The full-format tags of an instance, from its verified stored bytes."""
    ds, stopped_at = read_dataset(store.read_file(instance_id), whole=whole)
    answer = dataset_json(ds, _encodings(ds), ignore_length=ignore_length, strings_only=strings_only)
    if stopped_at is not None and not strings_only:
        answer[format_tag(stopped_at)] = {"Name": tag_name(stopped_at), "Type": "Null", "Value": None}
    return answer


def header_strings(store: Store, instance_id: str) -> dict[str, Any]:
    """The top-level `String` tags of an instance (full format), read from its stored file up to
    the pixel data only (shared-tags and find read many files: never their pixels)."""
    attachment = store.attachment(instance_id)
    source = store.area.open_dicom(attachment.uuid, attachment.compressed)
    if hasattr(source, "read"):
        ds, _ = read_dataset(source)
    else:
        with open(source, "rb") as f:
            ds, _ = read_dataset(f)
    return dataset_json(ds, _encodings(ds), strings_only=True)


def file_strings(store: Store, instance_id: str) -> dict[int, str]:
    """`DicomMap::FromDicomAsJson` of an instance: its top-level string values by tag, for
    searches on tags the index does not hold."""
    return {int(key.replace(",", ""), 16): node["Value"] for key, node in header_strings(store, instance_id).items()}


def _ignore_length(request: Request) -> frozenset[int]:
    """`ParseSetOfTags(..., "ignore-length")`: comma-separated tag names."""
    raw = request.query_params.get("ignore-length")
    if raw is None:
        return frozenset()
    return frozenset(parse_tag(token) for token in raw.split(",") if token)


# -- raw content -------------------------------------------------------------------------------

class _NoAnswer(Exception):
    """Orthanc's handler returned without answering: its REST layer sends a bare 404."""


def _content(data: bytes, path: list[str]) -> Response:
    if len(path) in (1, 2) and parse_tag(path[0]) == PIXEL_DATA:
        return _pixel_data(data, path[1] if len(path) == 2 else None)
    ds, _ = read_dataset(data, whole=True)
    for position in range(len(path) // 2):
        index_text = path[2 * position + 1]
        if not (index_text.isascii() and index_text.isdigit()):
            raise _NoAnswer
        tag = parse_tag(path[2 * position])
        elem = ds.get_item(tag)
        if elem is None or not _is_sequence(elem, tag):
            raise _NoAnswer
        items = ds[tag].value or []
        if int(index_text) >= len(items):
            raise _NoAnswer
        ds = items[int(index_text)]
    if len(path) % 2 == 0:
        return json_answer([format_tag(tag, "-") for tag in sorted(ds.keys())])
    tag = parse_tag(path[-1])
    elem = ds.get_item(tag)
    if elem is None:
        raise _NoAnswer
    if _is_sequence(elem, tag):
        return json_answer([str(i) for i in range(len(ds[tag].value or []))])
    return Response(_raw_bytes(elem, tag), media_type="application/octet-stream")


def _raw_bytes(elem: Any, tag: int) -> bytes:
    """The value as stored, numbers in little-endian order (DCMTK's local byte order)."""
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        vr = _vr_of(elem, tag)
        width = _BINARY_WIDTH.get(vr or "")
        if not elem.is_little_endian and width and len(raw) % width == 0:
            raw = b"".join(raw[i:i + width][::-1] for i in range(0, len(raw), width))
        return raw
    value = elem.value  # converted by pydicom (SpecificCharacterSet...): encode it back
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else str(value)
    raw = text.encode("latin-1", "replace")
    if len(raw) % 2:
        raw += b"\0" if elem.VR == "UI" else b" "
    return raw


def _fragments(value: bytes) -> list[bytes] | None:
    """The items of encapsulated pixel data (offset table first), None if not encapsulated."""
    items = []
    offset = 0
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            return None
        items.append(value[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return items


def _pixel_data(data: bytes, block: str | None) -> Response:
    ds, _ = read_dataset(data, whole=True)
    elem = ds.get_item(PIXEL_DATA)
    if elem is None:
        raise _NoAnswer
    raw = elem.value if isinstance(elem, RawDataElement) else elem.value
    raw = raw or b""
    encapsulated = isinstance(elem, RawDataElement) and elem.length == 0xFFFFFFFF
    fragments = _fragments(raw) if encapsulated else None
    blocks = len(fragments) if fragments is not None else 1
    if block is None:
        return json_answer([str(i) for i in range(blocks)])
    if not (block.isascii() and block.isdigit()) or int(block) >= blocks:
        raise _NoAnswer
    body = fragments[int(block)] if fragments is not None else _raw_bytes(elem, PIXEL_DATA)
    return Response(body, media_type="application/octet-stream")


# -- routes ------------------------------------------------------------------------------------

def _store(request: Request) -> Store:
    return request.app.state.store


def _any_level(store: Store, public_id: str, first: Level) -> Resource:
    """The resource with this ID whatever its level (the URI's level tried first)."""
    for level in (first, *(lvl for lvl in Level if lvl != first)):
        try:
            return store.resource(level, public_id)
        except UnknownResource:
            continue
    raise UnknownResource(f"Unknown resource: {public_id}")


async def get_tags(request: Request) -> Response:
    return await _tags(request, dicom_format(request, FULL))


async def get_simplified_tags(request: Request) -> Response:
    return await _tags(request, HUMAN)


async def _tags(request: Request, fmt: str) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    whole = bool_argument(request, "whole")
    ignore = _ignore_length(request)

    def work() -> dict[str, Any]:
        return formatted(instance_json(store, public_id, whole=whole, ignore_length=ignore), fmt)

    return json_answer(await to_thread.run_sync(work))


async def get_header(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    fmt = dicom_format(request, FULL)

    def work() -> dict[str, Any]:
        ds, _ = read_dataset(store.read_file(public_id))
        return formatted(header_json(ds), fmt)

    return json_answer(await to_thread.run_sync(work))


async def get_content(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    path = [p for p in request.path_params.get("path", "").split("/") if p]

    def work() -> Response:
        data = store.read_file(public_id)
        try:
            return _content(data, path)
        except _NoAnswer:
            return Response(b"", status_code=404)

    return await to_thread.run_sync(work)


async def get_shared_tags(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    fmt = dicom_format(request, FULL)
    first = core._LEVELS[request.path_params["level"]]

    def work() -> dict[str, Any]:
        resource = _any_level(store, public_id, first)
        shared: dict[str, Any] | None = None
        for instance_id in store.index.descendants(resource, Level.INSTANCE):
            try:
                tags = header_strings(store, instance_id)
            except UnknownResource:
                continue  # deleted meanwhile (Orthanc ignores it too)
            if shared is None:
                shared = tags
            else:
                shared = {k: v for k, v in shared.items() if k in tags and tags[k]["Value"] == v["Value"]}
        return formatted(shared or {}, fmt)

    return json_answer(await to_thread.run_sync(work))


async def get_statistics(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    first = core._LEVELS[request.path_params["level"]]

    def work() -> dict[str, Any]:
        resource = _any_level(store, public_id, first)
        files = store.index.instance_files(resource.level, public_id)
        disk = sum(f.attachment.stored_size for f in files)
        uncompressed = sum(f.attachment.size for f in files)
        answer: dict[str, Any] = {}
        for prefix in ("", "Dicom"):  # only DICOM attachments exist here
            answer[f"{prefix}DiskSize"] = str(disk)
            answer[f"{prefix}DiskSizeMB"] = disk // MIB
            answer[f"{prefix}UncompressedSize"] = str(uncompressed)
            answer[f"{prefix}UncompressedSizeMB"] = uncompressed // MIB
        for level, key in ((Level.STUDY, "CountStudies"), (Level.SERIES, "CountSeries"),
                           (Level.INSTANCE, "CountInstances")):
            if level > resource.level:
                answer[key] = len(files) if level == Level.INSTANCE else len(store.index.descendants(resource, level))
        return answer

    return json_answer(await to_thread.run_sync(work))


async def get_attachments(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    level = core._LEVELS[request.path_params["level"]]
    full = "full" in request.query_params

    def work() -> Any:
        store.resource(level, public_id)  # UnknownResource if absent at that level
        names = {"dicom": 1} if level == Level.INSTANCE else {}
        return names if full else sorted(names)

    return json_answer(await to_thread.run_sync(work))


class _ParentLevelConvertor(Convertor):
    regex = "patients|studies|series"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("parentlevel", _ParentLevelConvertor())


def routes() -> list[Route]:
    return [
        core.route("/instances/{id}/tags", GET=get_tags),
        core.route("/instances/{id}/simplified-tags", GET=get_simplified_tags),
        core.route("/instances/{id}/header", GET=get_header),
        core.route("/instances/{id}/content", GET=get_content),
        core.route("/instances/{id}/content/{path:path}", GET=get_content),
        core.route("/{level:parentlevel}/{id}/shared-tags", GET=get_shared_tags),
        core.route("/{level:level}/{id}/statistics", GET=get_statistics),
        core.route("/{level:level}/{id}/attachments", GET=get_attachments),
    ]
