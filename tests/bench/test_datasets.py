"""bench.datasets: deterministic, valid Part 10, realistic pixels (tiny sizes, fast)."""
from __future__ import annotations

import hashlib
import io
import sys
import zlib
from array import array
from pathlib import Path

import pydicom
import pytest

from bench import datasets
from bench.datasets import (
    JPEG_SOURCES, ensure_study, generate_study, iter_study_files, load_manifest, orthanc_id,
)

# Small but representative: ct keeps the real 512x512 matrix so the gzip ratio means something.
SIZES = {
    "ct": {"instances": 7},
    "small": {"instances": 10},
    "large": {"instances": 3, "frames": 5, "matrix": 64},
    "jpeg": {"instances": len(JPEG_SOURCES) + 2},
}
SIZE_RANGE = {                       # bytes per file
    "ct": (520_000, 540_000),
    "small": (10_000, 41_000),
    "large": (5 * 64 * 64 * 2, 5 * 64 * 64 * 2 + 20_000),
    "jpeg": (2_000, 900_000),
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, datasets.StudyManifest]:
    base = tmp_path_factory.mktemp("studies")
    return {kind: generate_study(kind, base / kind, **kw) for kind, kw in SIZES.items()}


def _pixels16(ds) -> array:
    a = array("H")
    a.frombytes(bytes(ds.PixelData))
    if sys.byteorder == "big":
        a.byteswap()
    return a


@pytest.mark.parametrize("kind", list(SIZES))
def test_byte_identical_between_runs(kind, studies, tmp_path):
    again = generate_study(kind, tmp_path / kind, **SIZES[kind])
    first = studies[kind]
    assert [f.path for f in again.files] == [f.path for f in first.files]
    for a, b in zip(first.paths(), again.paths()):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (first.root / "manifest.json").read_text() == (again.root / "manifest.json").read_text()


@pytest.mark.parametrize("kind", list(SIZES))
def test_valid_part10_with_fresh_uids(kind, studies):
    m = studies[kind]
    assert len(m.files) == SIZES[kind]["instances"]
    sops, series = set(), set()
    for f, path in zip(m.files, m.paths()):
        data = path.read_bytes()
        assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
        assert len(data) == f.size and hashlib.md5(data).hexdigest() == f.md5
        ds = pydicom.dcmread(io.BytesIO(data))
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == f.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == f.SOPClassUID
        assert meta.TransferSyntaxUID == f.TransferSyntaxUID
        assert ds.PatientID == m.PatientID == f.PatientID
        assert ds.StudyInstanceUID == m.StudyInstanceUID == f.StudyInstanceUID
        assert ds.SeriesInstanceUID == f.SeriesInstanceUID
        assert int(ds.get("NumberOfFrames", 1) or 1) == f.NumberOfFrames
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert uid.startswith(datasets.UID_PREFIX) and len(uid) <= 64 and uid.is_valid
        assert "OtherPatientIDsSequence" not in ds
        sops.add(ds.SOPInstanceUID)
        series.add(ds.SeriesInstanceUID)
        if not meta.TransferSyntaxUID.is_compressed:
            expected = ds.Rows * ds.Columns * f.NumberOfFrames * ds.BitsAllocated // 8
            assert len(ds.PixelData) == expected
    assert len(sops) == len(m.files)
    assert len(series) == min(len(m.files), {"ct": 3, "small": 8, "large": 3, "jpeg": len(JPEG_SOURCES)}[kind])


def test_uids_depend_on_seed_and_kind(tmp_path):
    a = list(iter_study_files("small", instances=2, seed=1))
    b = list(iter_study_files("small", instances=2, seed=2))
    c = list(iter_study_files("ct", instances=2, seed=1, matrix=32))
    uids = [f.SOPInstanceUID for f, _ in a + b + c]
    assert len(set(uids)) == len(uids)
    assert a[0][0].PatientID != b[0][0].PatientID


@pytest.mark.parametrize("kind", list(SIZES))
def test_sizes(kind, studies):
    lo, hi = SIZE_RANGE[kind]
    for f in studies[kind].files:
        assert lo <= f.size <= hi, (f.path, f.size)


@pytest.mark.parametrize("kind", ["ct", "small", "large"])
def test_pixels_realistic_and_varying(kind, studies):
    frames = []
    for path in studies[kind].paths():
        ds = pydicom.dcmread(path)
        px = _pixels16(ds)
        n = ds.Rows * ds.Columns
        for i in range(len(px) // n):
            frame = px[i * n:(i + 1) * n]
            assert max(frame) - min(frame) > 200          # real contrast, not constant
            frames.append(frame.tobytes())
    assert len(set(frames)) == len(frames)                # every slice / frame differs
    a, b = frames[0], frames[1]
    diff = sum(1 for i in range(0, len(a), 2) if a[i:i + 2] != b[i:i + 2])
    assert diff > len(a) // 4                             # they differ all over, not in a corner


def test_ct_gzip_ratio_is_realistic(studies):
    m = studies["ct"]
    raw = b"".join(p.read_bytes() for p in m.paths())
    ratio = len(raw) / len(zlib.compress(raw, 6))
    assert 1.5 < ratio < 20, ratio


def test_jpeg_keeps_compressed_pixels(studies):
    m = studies["jpeg"]
    for f, path in zip(m.files, m.paths()):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        src = pydicom.dcmread(io.BytesIO(datasets._source_bytes(f.source)))
        assert bytes(ds.PixelData) == bytes(src.PixelData)
    assert m.sources == {n: hashlib.md5(datasets._source_bytes(n)).hexdigest() for n in JPEG_SOURCES}


def test_iter_study_files_matches_disk(studies):
    m = studies["large"]
    mem = list(iter_study_files("large", **SIZES["large"]))
    assert [f for f, _ in mem] == m.files
    assert [data for _, data in mem] == [p.read_bytes() for p in m.paths()]


def test_manifest_roundtrip_and_orthanc_ids(studies):
    m = studies["small"]
    again = load_manifest(m.root)
    assert again.files == m.files and again.total_bytes == m.total_bytes > 0
    f = m.files[0]
    ids = f.orthanc_ids()
    assert ids["patient"] == orthanc_id(f.PatientID)
    assert len(ids["instance"]) == 44 and ids["instance"].count("-") == 4


def test_ensure_study_reuses_and_regenerates(tmp_path):
    d = tmp_path / "cache"
    m1 = ensure_study("ct", d, instances=2, matrix=32)
    stamp = m1.paths()[0].stat().st_mtime_ns
    m2 = ensure_study("ct", d, instances=2, matrix=32)
    assert m2.paths()[0].stat().st_mtime_ns == stamp            # reused
    m3 = ensure_study("ct", d, instances=3, matrix=32)          # different request: regenerated
    assert len(m3.files) == 3 and len(list(d.rglob("*.dcm"))) == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("not ours")
    with pytest.raises(FileExistsError):
        ensure_study("ct", tmp_path / "foreign", instances=1, matrix=32)


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_study("mri", Path("/nonexistent"))
    with pytest.raises(ValueError):
        list(iter_study_files("small", frames=3))
    with pytest.raises(ValueError):
        list(iter_study_files("ct", instances=0))
