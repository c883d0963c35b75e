"""A fast reader for the header of an ordinary DICOM file, giving what pydicom would give.

`dicom._parse` needs ~50 top-level tags that all come before (0054,1330). pydicom's `read_partial`
finds them with a pure-Python loop that builds an object per element while holding the GIL
(~0.5 ms a file, much of the receiver's CPU during a transfer). This module walks the same bytes
with `struct`, keeps the `RawDataElement`s of the wanted tags exactly as pydicom builds them, and
only steps over the others.

It follows `read_partial(stream, stop_when=tag > stop_after, force=True)` step by step, but only
for ordinary files. Whenever pydicom would do something else (guess a missing transfer syntax,
inflate, read big endian, switch between implicit and explicit VR, read a command set or an
undefined-length value that is not a sequence, warn about or stop at truncated data...),
`scan_header` returns None and the caller lets pydicom read the file, so results and errors stay
pydicom's.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import BinaryIO

import pydicom.uid
from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

_BLOCK = 64 * 1024
_MAX_HEADER = 16 * 1024 * 1024  # a longer header is left to pydicom
_MAX_DEPTH = 32  # nested sequences
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET, _GROUP_LENGTH, _TRANSFER_SYNTAX = 0x00080005, 0x00020000, 0x00020010
_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)  # 2 reserved bytes, 32-bit length
_IMPLICIT_HEAD = struct.Struct("<HHL")  # also the head of items and delimiters
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_LENGTH_32 = struct.Struct("<L")


class _Fallback(Exception):
    """The scanner cannot vouch for this file: pydicom reads it."""


class _More(Exception):
    """The scan needs the file's first `size` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size


class Header:
    """What `dicom._parse` reads of pydicom's dataset: `get_item(tag)` and `file_meta`."""

    def __init__(self, elements: dict[int, RawDataElement | DataElement], file_meta: SimpleNamespace):
        self._elements = elements
        self.file_meta = file_meta

    def get_item(self, tag: int) -> RawDataElement | DataElement | None:
        elem = self._elements.get(tag)
        if isinstance(elem, RawDataElement) and elem.value is None:
            # Dataset.get_item converts an element without a value (empty, not text) on access
            return convert_raw_data_element(elem, encoding=default_encoding)
        return elem


def scan_header(stream: BinaryIO, stop_after: int, keep: frozenset[int]) -> Header | None:
    """The top-level elements of `keep` before the first tag above `stop_after`, or None (and
    the stream back where it was) when the file is not ordinary enough."""
    try:
        start = stream.tell()
    except Exception:
        return None
    data, size = b"", _BLOCK
    try:
        while True:
            data, eof = _read(stream, data, size)
            try:
                return _Scan(data, eof, start, stop_after, keep).header()
            except _More as more:
                size = max(more.size, 2 * size)
                if size > _MAX_HEADER:
                    raise _Fallback from None
    except Exception:  # _Fallback, or anything pydicom would have to judge
        stream.seek(start)
        return None


def _read(stream: BinaryIO, data: bytes, size: int) -> tuple[bytes, bool]:
    """The first `size` bytes (what of them was not read yet is read now), and whether the file
    ended before."""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _looks_explicit(data: bytes, pos: int) -> bool:
    """pydicom's `_is_implicit_vr` test on an element starting at `pos`: is a VR there?"""
    return 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B


def _charset(elem: RawDataElement) -> DataElement:
    """(0008,0005) converted as pydicom converts it while reading (in the generator, in
    `read_dataset` and in `Dataset._character_set`), with the same warnings or errors."""
    convert_encodings(convert_string(elem.value or b"", True))
    converted = convert_raw_data_element(elem, encoding=default_encoding)
    convert_encodings(converted.value)
    return converted


class _Scan:
    """One pass over the first bytes of a file (`eof`: they are the whole file)."""

    def __init__(self, data: bytes, eof: bool, start: int, stop_after: int, keep: frozenset[int]):
        self.data, self.eof, self.start = data, eof, start
        self.stop_after, self.keep = stop_after, keep

    def need(self, end: int) -> None:
        if end > len(self.data):
            raise _Fallback if self.eof else _More(end)

    def header(self) -> Header:
        self.need(132)
        if self.data[128:132] != b"DICM":  # no preamble: pydicom reads from the start
            raise _Fallback
        pos, syntax = self._file_meta(132)
        implicit = _implicit_vr(syntax)
        self.need(pos + 8)
        if self.data[pos:pos + 2] == b"\0\0":  # a command set (group 0000)
            raise _Fallback
        if _looks_explicit(self.data, pos) == implicit:  # pydicom would switch, with a warning
            raise _Fallback
        return Header(self._top_level(pos, implicit), SimpleNamespace(TransferSyntaxUID=syntax))

    def _file_meta(self, pos: int) -> tuple[int, object]:
        """Group 0002 as `_read_file_meta_info` reads it (explicit VR little endian, as long as
        the group is 0002, whatever (0002,0000) says): where it ends, and the transfer syntax."""
        raw: dict[int, RawDataElement] = {}
        while True:
            self.need(pos + 8)
            if self.data[pos:pos + 2] != b"\2\0":
                break
            tag, vr, length, value_pos = self._head(pos, False)
            if vr not in _VRS or vr == b"SQ" or length == _UNDEFINED or tag in raw:
                raise _Fallback
            pos = value_pos + length
            self.need(pos)
            raw[tag] = self._raw(tag, vr, length, value_pos, False)
        if _TRANSFER_SYNTAX not in raw:  # pydicom would guess it
            raise _Fallback
        # What pydicom converts, with the same errors: the first element, the group length and
        # the transfer syntax (`FileMetaDataset.elements` also converts empty ones: that cannot fail).
        for tag in {min(raw), _GROUP_LENGTH} & raw.keys():
            convert_raw_data_element(raw[tag], encoding=default_encoding)
        return pos, convert_raw_data_element(raw[_TRANSFER_SYNTAX], encoding=default_encoding).value

    def _top_level(self, pos: int, implicit: bool) -> dict[int, RawDataElement | DataElement]:
        """The elements of `keep` up to the first tag above `stop_after`, the others skipped."""
        data, keep, stop_after = self.data, self.keep, self.stop_after
        size = len(data)
        elements: dict[int, RawDataElement | DataElement] = {}
        while True:
            if pos + 12 <= size:  # `_head` inline: this runs for every element of the header
                if implicit:
                    group, element, length = _IMPLICIT_HEAD.unpack_from(data, pos)
                    vr, value_pos = None, pos + 8
                else:
                    group, element, vr, length = _EXPLICIT_HEAD.unpack_from(data, pos)
                    value_pos = pos + 8
                    if vr in _LONG_VRS:
                        length, value_pos = _LENGTH_32.unpack_from(data, value_pos)[0], pos + 12
                tag = group << 16 | element
            elif pos + 8 > size and self.eof:
                return elements  # fewer than 8 bytes left: pydicom ends the dataset there too
            else:
                tag, vr, length, value_pos = self._head(pos, implicit)
            if tag > stop_after:
                return elements
            if vr is not None and vr not in _VRS:
                raise _Fallback
            if length == _UNDEFINED:
                if tag in keep:  # pydicom would give a parsed sequence
                    raise _Fallback
                pos = self._undefined_length(tag, vr, value_pos, implicit, 0)
                continue
            pos = value_pos + length
            if pos > size:
                self.need(pos)
            if tag in keep:
                elem = self._raw(tag, vr, length, value_pos, implicit)
                elements[tag] = _charset(elem) if tag == _CHARSET else elem

    def _head(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Tag, VR (None in implicit VR), length and value position of the element at `pos`."""
        data = self.data
        self.need(pos + 8)
        if implicit:
            group, element, length = _IMPLICIT_HEAD.unpack_from(data, pos)
            return group << 16 | element, None, length, pos + 8
        group, element, vr, length = _EXPLICIT_HEAD.unpack_from(data, pos)
        if vr in _LONG_VRS:
            self.need(pos + 12)
            return group << 16 | element, vr, _LENGTH_32.unpack_from(data, pos + 8)[0], pos + 12
        return group << 16 | element, vr, length, pos + 8

    def _raw(self, tag: int, vr: bytes | None, length: int, pos: int, implicit: bool) -> RawDataElement:
        text_vr = None if vr is None else vr.decode()
        value = self.data[pos:pos + length] if length else empty_value_for_VR(text_vr, raw=True)
        return RawDataElement(BaseTag(tag), text_vr, length, value, self.start + pos, implicit, True)

    def _undefined_length(self, tag: int, vr: bytes | None, pos: int, implicit: bool, depth: int) -> int:
        """Skip an undefined-length element if pydicom would read it as a sequence."""
        if vr is None:  # implicit VR: the dictionary's, else a sequence if an item follows
            try:
                sequence = dictionary_VR(tag) == "SQ"
            except KeyError:
                self.need(pos + 4)
                sequence = self.data[pos:pos + 4] == b"\xfe\xff\x00\xe0"
        else:
            sequence = vr == b"SQ" or (vr == b"UN" and config.settings.infer_sq_for_un_vr)
        if not sequence:  # e.g. encapsulated pixel data
            raise _Fallback
        return self._sequence(pos, implicit, depth + 1)

    def _sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the items of an undefined-length sequence, up to its delimiter."""
        if depth > _MAX_DEPTH:
            raise _Fallback
        while True:
            self.need(pos + 8)
            group, element, length = _IMPLICIT_HEAD.unpack_from(self.data, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _Fallback
            item_implicit = implicit
            if not implicit:  # an item of an explicit VR sequence may be implicit VR
                self.need(pos + 6)
                item_implicit = not _looks_explicit(self.data, pos)
            pos = self._item(pos, None if length == _UNDEFINED else pos + length, item_implicit, depth)

    def _item(self, pos: int, end: int | None, implicit: bool, depth: int) -> int:
        """Skip the elements of an item, up to `end` or (undefined length) its delimiter."""
        while end is None or pos < end:
            tag, vr, length, value_pos = self._head(pos, implicit)
            if tag == _ITEM_END and end is None and self.data[pos + 4:pos + 8] == b"\0\0\0\0":
                return pos + 8
            if tag >> 16 == 0xFFFE or (vr is not None and vr not in _VRS):
                raise _Fallback
            if length == _UNDEFINED:
                pos = self._undefined_length(tag, vr, value_pos, implicit, depth)
                continue
            pos = value_pos + length
            self.need(pos)
            if tag == _CHARSET:  # pydicom converts it, which may warn or fail
                _charset(self._raw(tag, vr, length, value_pos, implicit))
        if pos != end:
            raise _Fallback
        return pos


def _implicit_vr(syntax: object) -> bool:
    """The dataset's encoding as `read_partial` derives it from the transfer syntax, when it is
    little endian and not deflated."""
    if not isinstance(syntax, str):  # multi-valued, or not text
        raise _Fallback
    if syntax == pydicom.uid.ImplicitVRLittleEndian:
        return True
    if syntax in (pydicom.uid.ExplicitVRBigEndian, pydicom.uid.DeflatedExplicitVRLittleEndian):
        raise _Fallback
    if syntax in pydicom.uid.PrivateTransferSyntaxes:
        raise _Fallback
    return False
