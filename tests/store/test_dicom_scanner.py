"""The fast header scanner of accelerator.store.dicom: exactly pydicom's result, or pydicom reads.

Every test compares `_parse` (scanner first) with `_parse_with_pydicom` (pydicom's `read_partial`
only): the same `ParsedInstance`, or the same exception type and message."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_partial
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
)

from accelerator.store import dicom
from accelerator.store.dicom_scan import scan_header
from protocol.errors import BadFileFormat
from protocol.resources import Level

# pydicom warns about much of what these files hold (unknown character sets, invalid UIDs...)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "data"


def _outcome(parse, data: bytes):
    try:
        return parse(io.BytesIO(data), len(data))
    except Exception as exc:  # compared by type and message
        return type(exc), str(exc)


def _same(data: bytes):
    """The outcome of `_parse`, checked against pydicom's."""
    fast = _outcome(dicom._parse, data)
    assert fast == _outcome(dicom._parse_with_pydicom, data)
    return fast


def _scanned(data: bytes) -> bool:
    """Whether the fast scanner reads this file itself (rather than leaving it to pydicom)."""
    return scan_header(io.BytesIO(data), dicom._LAST_MAIN_TAG, dicom._PARSED_TAGS) is not None


def _sample_files() -> list[Path]:
    """pydicom's test and character set files (DICOMDIR trees included), and pydicom-data's."""
    data = Path(pydicom.__file__).parent / "data"
    roots = [data / "test_files", data / "charset_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    files = {p for root in roots for p in root.rglob("*")} | {Path(p) for p in get_testdata_files()}
    return sorted(p for p in files if p.is_file() and not p.name.endswith((".py", ".pyc")))


def _bench_files() -> list[Path]:
    """A few files of each study the bench generated, if any."""
    files = []
    for study in sorted(_BENCH.glob("*/")):
        found = sorted(study.rglob("*.dcm"))
        files += found[:: max(1, len(found) // 4)][:4]
    return files


def _read(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _header_end(data: bytes) -> int:
    """Where pydicom stops reading the header."""
    stream = io.BytesIO(data)
    read_partial(stream, stop_when=dicom._past_main_tags, force=True)
    return stream.tell()


def _saved(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element (`length` to write another length than the value's)."""
    length = len(value) if length is None else length
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length) + value


def _span(data: bytes, tag: int) -> tuple[int, int]:
    """Where the top-level element `tag` of an explicit VR file (with a group length) starts
    and ends."""
    stream = io.BytesIO(data)
    stream.seek(144 + struct.unpack_from("<L", data, 140)[0])
    for elem in data_element_generator(stream, is_implicit_VR=False, is_little_endian=True):
        if elem.tag == tag:
            head = 12 if elem.VR in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR") else 8
            return elem.value_tell - head, elem.value_tell + elem.length
    raise KeyError(tag)


def _replace(data: bytes, tag: int, element: bytes) -> bytes:
    start, end = _span(data, tag)
    return data[:start] + element + data[end:]


def _with_syntax(data: bytes, uid: bytes) -> bytes:
    """The file with another (0002,0010) Transfer Syntax UID value (the group length unchanged:
    readers ignore it)."""
    at = data.index(b"\x02\x00\x10\x00UI")
    length = struct.unpack_from("<H", data, at + 6)[0]
    return data[:at] + _element(0x00020010, "UI", uid) + data[at + 8 + length:]


def _insert_before(data: bytes, tag: int, element: bytes) -> bytes:
    start, _ = _span(data, tag)
    return data[:start] + element + data[start:]


# -- equivalence on real files ----------------------------------------------------------------


@pytest.mark.parametrize("path", _sample_files(), ids=lambda p: p.name)
def test_every_sample_file_parses_as_with_pydicom(path):
    _same(path.read_bytes())


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> list[Path]:
    """A few files of each study the bench generated; on a fresh clone, small studies of each
    kind generated here the same way (real pydicom files, fresh UIDs)."""
    files = _bench_files()
    if not files:
        from bench.datasets import ensure_study
        root = tmp_path_factory.mktemp("bench-studies")
        for kind, extra in (("ct", {"matrix": 64}), ("mr", {"matrix": 64}), ("jpeg", {}), ("small", {})):
            files += ensure_study(kind, root / kind, instances=3, **extra).paths()
    return files


def test_bench_files_are_scanned_and_parse_as_with_pydicom(bench_files):
    assert len(bench_files) >= 9
    for path in bench_files:
        data = path.read_bytes()
        assert _scanned(data), path
        _same(data)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm"])
def test_common_files_take_the_fast_path(name):
    data = _read(name)
    assert _scanned(data)
    assert isinstance(_same(data), dicom.ParsedInstance)


def test_parse_file_and_stream_use_it_too(monkeypatch):
    seen = []
    real = dicom.scan_header

    def scan_header(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(dicom, "scan_header", scan_header)
    path = get_testdata_file("CT_small.dcm")
    with open(path, "rb") as f:
        assert dicom.parse_file(path) == dicom.parse_stream(f) == dicom.parse_bytes(_read("CT_small.dcm"))
    assert len(seen) == 3 and all(seen)


@pytest.mark.parametrize("name, syntax", [("MR_small_bigendian.dcm", ExplicitVRBigEndian),
                                          ("image_dfl.dcm", DeflatedExplicitVRLittleEndian)])
def test_big_endian_and_deflated_are_left_to_pydicom(name, syntax):
    data = _read(name)
    assert not _scanned(data)
    assert _same(data).transfer_syntax_uid == syntax


def test_a_file_without_preamble_is_left_to_pydicom():
    data = _read("CT_small.dcm")[132:]
    assert not _scanned(data)
    assert isinstance(_same(data), dicom.ParsedInstance)


@pytest.mark.parametrize("written, declared", [(ImplicitVRLittleEndian, ExplicitVRLittleEndian),
                                               (ExplicitVRLittleEndian, ImplicitVRLittleEndian)])
def test_a_dataset_not_in_its_declared_encoding_is_left_to_pydicom(written, declared):
    data = _saved(pydicom.dcmread(get_testdata_file("MR_small.dcm")), written)
    data = _with_syntax(data, declared.encode() + b"\0")
    assert not _scanned(data)
    _same(data)


def test_implicit_data_whose_first_length_looks_like_a_vr_is_left_to_pydicom():
    """pydicom reads an implicit VR dataset as explicit VR when its first element's length bytes
    read as a VR ("UL": 19541 bytes)."""
    data = _saved(pydicom.dcmread(get_testdata_file("MR_small.dcm")), ImplicitVRLittleEndian)
    start = data.index(b"\x08\x00\x08\x00")  # (0008,0008), the dataset's first element
    first = struct.pack("<HHL", 0x0008, 0x0001, 0x4C55) + bytes(0x4C55)
    data = data[:start] + first + data[start:]
    assert not _scanned(data)
    _same(data)


def test_the_last_main_tag_is_read():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.ImageIndex = 7
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        data = _saved(ds, syntax)
        assert _scanned(data)
        assert _same(data).tags[Level.INSTANCE]["ImageIndex"] == "7"


# -- crafted inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, step", [("CT_small.dcm", 7), ("MR_small_implicit.dcm", 3)])
def test_truncated_files(name, step):
    data = _read(name)
    for cut in range(0, _header_end(data) + 100, step):
        _same(data[:cut])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm"])
def test_random_corruptions_of_the_header(name):
    rng = random.Random(1234)
    data = _read(name)
    end = _header_end(data)
    for _ in range(300):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutant[rng.randrange(128, end)] = rng.choice([0, 0xFF, rng.randrange(256)])
        _same(bytes(mutant))


def _nested_sequences(syntax: str) -> bytes:
    """Undefined-length sequences and items, nested, before the main tags."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "121", "DCM"
    inner = Sequence([code])
    inner.is_undefined_length = True
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.ConceptNameCodeSequence = inner
    item.is_undefined_length_sequence_item = True
    defined = Dataset()
    defined.ReferencedSOPInstanceUID = "1.2.3.5"
    defined.is_undefined_length_sequence_item = False
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ReferencedStudySequence = Sequence([item, defined, Dataset()])
    ds["ReferencedStudySequence"].is_undefined_length = True
    return _saved(ds, syntax)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_undefined_length_sequences_before_the_main_tags(syntax):
    data = _nested_sequences(syntax)
    assert data.count(b"\xff\xff\xff\xff") >= 3
    assert _scanned(data)
    parsed = _same(data)
    assert parsed.tags[Level.PATIENT]["PatientName"] == "CompressedSamples^CT1"


def test_truncated_nested_sequences():
    data = _nested_sequences(ExplicitVRLittleEndian)
    start = data.index(b"\x08\x00\x10\x11SQ")
    for cut in range(start, start + 200):
        _same(data[:cut])


def test_an_undefined_length_un_element_is_read_as_an_implicit_vr_sequence():
    """(CP 246) an unknown sequence converted to explicit VR: UN, undefined length, implicit VR
    items."""
    item = struct.pack("<HHL", 0x0009, 0x1011, 4) + b"ABCD" + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence = (_element(0x00091010, "UN", b"", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
                + item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    data = _insert_before(_read("CT_small.dcm"), 0x00100010, sequence)
    assert _scanned(data)
    assert _same(data) == _same(_read("CT_small.dcm"))


def test_undefined_length_values_that_are_not_sequences_are_left_to_pydicom():
    encapsulated = (_element(0x00091010, "OB", b"", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 2) + b"xy"
                    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    data = _insert_before(_read("CT_small.dcm"), 0x00100010, encapsulated)
    assert not _scanned(data)
    _same(data)


@pytest.mark.parametrize("length", [0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0])
def test_huge_declared_lengths(length):
    data = _read("CT_small.dcm")
    _same(_insert_before(data, 0x00100010, _element(0x00091099, "OB", b"", length)))
    if length <= 0xFFFF:
        _same(_insert_before(data, 0x00100010, _element(0x00091099, "LO", b"", length)))


def test_a_header_longer_than_the_scanner_reads_is_left_to_pydicom():
    data = _insert_before(_read("MR_small.dcm"), 0x00100010, _element(0x00091099, "OB", bytes(17 << 20)))
    assert not _scanned(data)
    assert _same(data) == _same(_read("MR_small.dcm"))


def test_a_header_past_the_first_block_is_scanned():
    data = _insert_before(_read("MR_small.dcm"), 0x00100010, _element(0x00091099, "OB", bytes(300_000)))
    assert _scanned(data)
    assert _same(data) == _same(_read("MR_small.dcm"))


@pytest.mark.parametrize("vr", [b"ZZ", b"zz", b"\x01\x02", b"O\x00"])
def test_unknown_vrs(vr):
    data = bytearray(_read("CT_small.dcm"))
    start, _ = _span(bytes(data), 0x00080060)  # Modality, before the other main tags
    data[start + 4:start + 6] = vr
    assert not _scanned(bytes(data))
    _same(bytes(data))


def test_a_repeated_tag_keeps_the_later_value():
    data = _read("CT_small.dcm")
    _, end = _span(data, 0x00100020)
    data = data[:end] + _element(0x00100020, "LO", b"OTHER ") + data[end:]
    assert _scanned(data)
    assert _same(data).tags[Level.PATIENT]["PatientID"] == "OTHER"


def test_empty_values_are_converted_as_pydicom_converts_them():
    """pydicom's `get_item` converts an element read without value (empty, no text VR)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.InstanceNumber = None
    ds.SeriesNumber = None
    ds.PixelRepresentation = None
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        data = _saved(ds, syntax)
        assert _scanned(data)
        assert _same(data).tags[Level.INSTANCE]["InstanceNumber"] == ""
    data = _read("MR_small.dcm")
    for tag in (0x00080060, 0x00080080, 0x00200011, 0x00280103):  # CS, LO, IS, US
        for vr in ("UN", "OB", "US", "IS"):
            _same(_replace(data, tag, _element(tag, vr, b"")))


@pytest.mark.parametrize("charset", [b"ISO_IR 100\0", b" ISO_IR 192", b"\\ISO 2022 IR 87", b"ISO_IR 999",
                                     b"ISO_IR 100\\ISO_IR 192", b"\xe9", b""])
def test_odd_character_sets(charset):
    data = _read("CT_small.dcm")
    for vr in ("CS", "UN", "LO"):
        _same(_replace(data, 0x00080005, _element(0x00080005, vr, charset)))


@pytest.mark.parametrize("padded", [b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.1 ", b"1.2.840.10008.1.2.1 \0"])
def test_padded_transfer_syntax(padded):
    data = _with_syntax(_read("MR_small.dcm"), padded)
    assert _scanned(data)
    assert _same(data).transfer_syntax_uid == padded.decode().rstrip("\0 ")


def test_garbage_is_bad_file_format_either_way():
    for data in (b"", b"\0" * 132, b"\0" * 128 + b"DICM", bytes(range(256)) * 8, b"\0" * 128 + b"DICM" + b"\xff" * 64):
        outcome = _same(data)
        assert outcome[0] is BadFileFormat
