"""Deterministic benchmark studies built from real DICOM files.

Benchmark numbers only mean something if the data looks like hospital data: random bytes make
every compressor useless and constant pixels make them look miraculous. So every study here is
derived from files shipped with pydicom (``pydicom/data/test_files``) and pydicom-data
(``data_store/data``): real headers (private tags included), real pixel values, re-identified
with fresh UIDs. Uncompressed images are resized with bilinear interpolation and varied per
slice/frame (a small rigid shift, a slowly moving shading wave and low-amplitude pseudo noise
at a different offset per slice), so slices differ everywhere yet stay image-like and compress
about as well as their sources (gzip ~1.7x for "ct", like CT_small itself at 1.6x; a full
field-of-view CT with air around the body, e.g. pydicom-data's 693_UNCR.dcm, gives ~2.7x).

Everything is a pure function of the arguments: UIDs come from ``generate_uid`` with a fixed
prefix and entropy built from (kind, seed, size, role, indices); noise comes from SHAKE-256;
nothing reads the clock. Two runs with the same arguments give byte-identical files.

Kinds (defaults):
  ct     300 CT slices 512x512 16-bit (~0.52 MB each) in 3 series, from CT_small.dcm
  small  2000 CT/MR images of 10-40 kB in 8 series, from CT_small.dcm and MR_small.dcm
  large  3 multi-frame instances of 224 frames 512x512 (~117 MB each), from CT/MR frames
  mr     440 MR slices 256x256 16-bit (12 bits stored, ~0.13 MB each) in 3 series, from the real
         MR files of pydicom-data (MR2_UNCR.dcm, MR-SIEMENS-DICOM-WithOverlays.dcm, emri_small.dcm's
         10 frames), with MR-like low noise (0..6) instead of CT's: MR and CT compress differently
  jpeg   80 instances: 5 copies of each of 16 JPEG / JPEG-LS / JPEG 2000 encoded files, one
         series per file (~12 MB, 3 kB..830 kB each). The compressed pixel data is copied as is
         (there is no encoder here), only the header changes.

CLI: ``python -m bench.datasets KIND OUTDIR [--instances N] [--seed S] [--frames F] [--matrix M]``
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid

__all__ = [
    "KINDS", "ManifestFile", "StudyManifest", "generate_study", "ensure_study",
    "iter_study_files", "load_manifest", "orthanc_id",
]

MANIFEST_NAME = "manifest.json"
GENERATOR = "bench.datasets/1"
#: pydicom's registered root, meant for exactly this kind of generated UID.
UID_PREFIX = pydicom.uid.PYDICOM_ROOT_UID
IMPLEMENTATION_UID = UID(UID_PREFIX + "77.1")
IMPLEMENTATION_VERSION = "ACCEL_BENCH_1"
NAMESPACE = "accelerator-bench"

KINDS = ("ct", "small", "large", "jpeg", "mr")
DEFAULTS = {
    "ct": {"instances": 300, "matrix": 512},
    "mr": {"instances": 440, "matrix": 256},
    "small": {"instances": 2000},
    "large": {"instances": 3, "frames": 224, "matrix": 512},
    "jpeg": {"instances": 80},
}

# (source file, matrix) per series of the "small" kind: file sizes spread over 12..40 kB.
SMALL_LAYOUT = (
    ("MR_small.dcm", 72), ("MR_small.dcm", 96), ("CT_small.dcm", 96), ("MR_small.dcm", 112),
    ("CT_small.dcm", 128), ("MR_small.dcm", 80), ("CT_small.dcm", 112), ("MR_small.dcm", 128),
)
# (pixel source, header source) per instance of the "large" kind, cycled.
LARGE_LAYOUT = (("CT_small.dcm", "CT_small.dcm"), ("emri_small.dcm", "MR_small.dcm"),
                ("MR_small.dcm", "MR_small.dcm"))
# Already-compressed files, one series each; all medical modalities and the common codecs.
JPEG_SOURCES = (
    "693_J2KR.dcm",          # CT 512x512, JPEG 2000 lossless
    "693_J2KI.dcm",          # CT 512x512, JPEG 2000 lossy
    "MR2_J2KR.dcm",          # MR 1024x1024, JPEG 2000 lossless
    "MR2_J2KI.dcm",          # MR 1024x1024, JPEG 2000 lossy
    "RG3_J2KR.dcm",          # CR 1760x1760, JPEG 2000 lossless
    "US1_J2KR.dcm",          # US RGB, JPEG 2000 lossless
    "JPEG2000.dcm",          # NM, JPEG 2000
    "JPEG-LL.dcm",           # NM, JPEG lossless process 14
    "JPGExtended.dcm",       # NM, JPEG extended (12-bit lossy)
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US 8-bit, JPEG lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # RGB, JPEG baseline
    "SC_rgb_jpeg_gdcm.dcm",  # RGB, JPEG lossless
    "MR_small_jpeg_ls_lossless.dcm",   # MR, JPEG-LS lossless
    "emri_small_jpeg_2k_lossless.dcm",  # enhanced MR 10 frames, JPEG 2000 lossless
    "emri_small_jpeg_ls_lossless.dcm",  # enhanced MR 10 frames, JPEG-LS lossless
    "examples_ybr_color.dcm",  # US 30 frames YBR, JPEG baseline
)

NOISE_TABLE = bytes((b & 15) + (b >> 4) for b in range(256))  # triangular 0..30, like CT noise
NOISE_MAX = 30
MR_NOISE_TABLE = bytes((b & 3) + (b >> 6) for b in range(256))  # triangular 0..6: MR's lower noise
MR_NOISE_MAX = 6
# (pixel source, header source, series description) per series of the "mr" kind: real MR files.
MR_LAYOUT = (("MR2_UNCR.dcm", "MR2_UNCR.dcm", "T2 axial"),
             ("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "T1 sagittal"),
             ("emri_small.dcm", "emri_small.dcm", "multi-slice"))
WAVE_AMP = 40        # shading that drifts through the volume (beam-hardening-like)


# --------------------------------------------------------------------------- manifest

@dataclass
class ManifestFile:
    """One generated instance: where it is, what it contains, how to check it."""
    path: str                 # relative to the study directory, POSIX separators
    size: int
    md5: str
    PatientID: str
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str
    SeriesNumber: int
    InstanceNumber: int
    NumberOfFrames: int
    source: str

    def orthanc_ids(self) -> dict[str, str]:
        """Orthanc's public identifiers, to check what the daemon answers."""
        p, st, se, sop = self.PatientID, self.StudyInstanceUID, self.SeriesInstanceUID, self.SOPInstanceUID
        return {"patient": orthanc_id(p), "study": orthanc_id(p, st),
                "series": orthanc_id(p, st, se), "instance": orthanc_id(p, st, se, sop)}


@dataclass
class StudyManifest:
    """What ``generate_study`` wrote; saved as ``manifest.json`` beside the files."""
    kind: str
    seed: int
    params: dict
    PatientID: str
    StudyInstanceUID: str
    sources: dict[str, str]                 # source file name -> md5
    files: list[ManifestFile] = field(default_factory=list)
    root: Path | None = None                # directory holding the files (not serialized)
    generator: str = GENERATOR

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def paths(self) -> list[Path]:
        if self.root is None:
            raise ValueError("manifest has no root directory")
        return [self.root / f.path for f in self.files]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d["total_bytes"] = self.total_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> "StudyManifest":
        d = dict(d)
        d.pop("total_bytes", None)
        files = [ManifestFile(**f) for f in d.pop("files")]
        return cls(files=files, root=root, **d)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path


def load_manifest(directory: Path) -> StudyManifest:
    directory = Path(directory)
    return StudyManifest.from_dict(json.loads((directory / MANIFEST_NAME).read_text()), root=directory)


def orthanc_id(*parts: str) -> str:
    """Orthanc's identifier: SHA-1 of the '|'-joined DICOM identifiers, in 8-char groups."""
    h = hashlib.sha1("|".join(parts).encode("ascii")).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


# --------------------------------------------------------------------------- sources

def _source_dirs() -> list[Path]:
    dirs = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # pydicom-data
        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return dirs


@lru_cache(maxsize=None)
def _source_bytes(name: str) -> bytes:
    """Read a bundled file from disk only: pydicom's own lookup could try to download it."""
    for d in _source_dirs():
        if (d / name).is_file():
            return (d / name).read_bytes()
    raise FileNotFoundError(f"{name} is neither in pydicom's test files nor in pydicom-data "
                            f"(pip install pydicom-data)")


@lru_cache(maxsize=None)
def _source(name: str) -> Dataset:
    """Parsed source; shared, so callers deep-copy before changing it."""
    return pydicom.dcmread(io.BytesIO(_source_bytes(name)))


def _source_md5(name: str) -> str:
    return hashlib.md5(_source_bytes(name)).hexdigest()


# --------------------------------------------------------------------------- pixels
# Images are little-endian unsigned 16-bit bytes. Per-pixel arithmetic uses one big-int
# addition over the whole buffer (C speed, no numpy); callers keep every sum <= 0x7FFF so no
# carry crosses a pixel boundary.

def _to_bytes16(values: Iterable[int]) -> bytes:
    a = array("H", values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _from_bytes16(data: bytes) -> array:
    a = array("H")
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


def _add16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") + int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _roll(data: bytes, pixels: int) -> bytes:
    k = (pixels * 2) % len(data)
    return data[k:] + data[:k]


def _resize(values: list[int], rows: int, cols: int, new_rows: int, new_cols: int) -> list[int]:
    """Bilinear resize (separable): smooth, so upscaled images keep a realistic spectrum."""
    def axis(n, new_n):
        out = []
        for i in range(new_n):
            s = min(max((i + 0.5) * n / new_n - 0.5, 0.0), n - 1.0)
            i0 = int(s)
            i1 = min(i0 + 1, n - 1)
            out.append((i0, i1, s - i0))
        return out

    xmap, ymap = axis(cols, new_cols), axis(rows, new_rows)
    horiz = []
    for r in range(rows):
        row = values[r * cols:(r + 1) * cols]
        horiz.append([row[a] + (row[b] - row[a]) * f for a, b, f in xmap])
    out: list[int] = []
    for a, b, f in ymap:
        ra, rb = horiz[a], horiz[b]
        out.extend(int(x + (y - x) * f + 0.5) for x, y in zip(ra, rb))
    return out


@dataclass(frozen=True)
class _Image:
    rows: int
    cols: int
    data: bytes          # unsigned 16-bit little endian
    max_value: int


def _frames_of(name: str) -> tuple[int, int, list[list[int]]]:
    """Pixel values of every frame of an uncompressed 16-bit source, shifted to be >= 0."""
    ds = _source(name)
    if ds.BitsAllocated != 16 or ds.get("SamplesPerPixel", 1) != 1:
        raise ValueError(f"{name}: need 16-bit grayscale")
    rows, cols, n = ds.Rows, ds.Columns, int(ds.get("NumberOfFrames", 1) or 1)
    raw = bytes(ds.PixelData)
    vals = list(struct.unpack("<%d%s" % (rows * cols * n, "h" if ds.PixelRepresentation else "H"), raw))
    if min(vals) < 0:
        raise ValueError(f"{name}: negative stored values are not supported")
    return rows, cols, [vals[i * rows * cols:(i + 1) * rows * cols] for i in range(n)]


@lru_cache(maxsize=64)
def _base_image(name: str, frame: int, rows: int, cols: int, orientation: int = 0) -> _Image:
    """A source frame resized to rows x cols; orientation 1/2/3 = flip vertical/horizontal/both."""
    r0, c0, frames = _frames_of(name)
    vals = frames[frame % len(frames)]
    if (r0, c0) != (rows, cols):
        vals = _resize(vals, r0, c0, rows, cols)
    data = _to_bytes16(vals)
    if orientation & 2:                          # 180 degree rotation, then maybe undo rows
        a = _from_bytes16(data)
        a.reverse()
        data = _to_bytes16(a)
        orientation ^= 1
    if orientation & 1:
        stride = cols * 2
        data = b"".join(data[r * stride:(r + 1) * stride] for r in reversed(range(rows)))
    return _Image(rows, cols, data, max(vals))


@lru_cache(maxsize=8)
def _noise(key: str, pixels: int, table: bytes = NOISE_TABLE) -> bytes:
    """Deterministic triangular noise (0..30 by default) per 16-bit pixel (SHAKE-256, C speed)."""
    raw = hashlib.shake_256(f"{NAMESPACE}|noise|{key}".encode()).digest(pixels).translate(table)
    buf = bytearray(2 * pixels)
    buf[0::2] = raw
    return bytes(buf)


@lru_cache(maxsize=8)
def _wave(rows: int, cols: int, period: int) -> bytes:
    """Row-constant cosine shading over rows + period rows, sliced per slice to move it."""
    out = []
    for y in range(rows + period):
        v = int(round(WAVE_AMP * (1 - math.cos(2 * math.pi * y / period)) / 2))
        out.append(struct.pack("<H", v) * cols)
    return b"".join(out)


def _triangle(i: int, amp: int, period: int) -> int:
    """Triangle wave in [-amp, amp]: slow back-and-forth drift like patient/table motion."""
    return int(round(amp * (4 * abs((i % period) / period - 0.5) - 1)))


def _xorshift(seed: int) -> Iterator[int]:
    x = seed & 0xFFFFFFFF or 1
    while True:
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        yield x


class _Varier:
    """Derives slice/frame ``i`` from a base image: shift + moving shading + shifted noise.

    Each slice reads the noise buffer at its own pseudo-random offset, so no two slices share
    long identical runs (which would flatter long-window compressors), yet each slice is the
    real image plus CT-like noise.
    """

    def __init__(self, key: str, rows: int, cols: int, table: bytes = NOISE_TABLE):
        self.rows, self.cols, self.n = rows, cols, rows * cols
        self.extra = cols * max(8, rows // 4)
        self.noise = _noise(f"{key}|{rows}x{cols}", self.n + self.extra, table)
        self.period = max(4, rows // 2)
        self.wave = _wave(rows, cols, self.period)
        self.offsets = _xorshift(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))

    def frame(self, base: _Image, i: int) -> bytes:
        if base.max_value + NOISE_MAX + WAVE_AMP > 0x7FFF:
            raise ValueError("base image too bright for carry-free addition")
        dy = _triangle(i, max(1, self.rows // 16), 64)
        dx = _triangle(i + 16, max(1, self.cols // 32), 48)
        img = _roll(base.data, dy * self.cols + dx)
        off = next(self.offsets) % self.extra
        img = _add16(img, self.noise[2 * off:2 * (off + self.n)])
        w = (i * 3) % self.period * self.cols
        return _add16(img, self.wave[2 * w:2 * (w + self.n)])


# --------------------------------------------------------------------------- headers

_DROP = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
         "PatientTelephoneNumbers", "SmallestImagePixelValue", "LargestImagePixelValue",
         "IssuerOfPatientID")
_DROP_META = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
              "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation")
_REMAP_KEYWORDS = {"FrameOfReferenceUID", "ReferencedFrameOfReferenceUID", "ConcatenationUID",
                   "DimensionOrganizationUID", "SynchronizationFrameOfReferenceUID",
                   "IrradiationEventUID", "RelatedFrameOfReferenceUID"}
PIXEL_DATA = Tag(0x7FE0, 0x0010)


class _Study:
    """Identity of one generated study: patient, study UID and the UID factory."""

    def __init__(self, kind: str, seed: int, params: dict):
        self.kind, self.seed, self.params = kind, seed, params
        self.key = f"{kind}|{seed}|" + "|".join(f"{k}={params[k]}" for k in sorted(params))
        self.patient_id = f"BENCH-{kind.upper()}-{seed:04d}"
        self.patient_name = f"Bench^{kind.upper()} {seed}"
        day = (seed * 37) % 365
        self.date = time.strftime("%Y%m%d", time.gmtime(1735689600 + 86400 * day))  # 2025 + day
        self.birth = f"19{50 + seed % 50:02d}0101"
        self.study_uid = self.uid("study")
        self.accession = hashlib.sha1(self.key.encode()).hexdigest()[:12].upper()

    def uid(self, *parts) -> str:
        return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[NAMESPACE, self.key, *map(str, parts)]))

    def remap(self, ds: Dataset) -> None:
        """Replace every instance-type UID (nested references too) with a fresh one."""
        def cb(d, elem):
            kw = elem.keyword
            if elem.VR == "UI" and elem.value and (kw.endswith("InstanceUID") or kw in _REMAP_KEYWORDS):
                if elem.VM > 1:
                    elem.value = [self.uid("ref", v) for v in elem.value]
                else:
                    elem.value = self.uid("ref", elem.value)
        ds.walk(cb, recursive=True)


def _series_template(study: _Study, src: Dataset, *, series_number: int, description: str,
                     source: str) -> Dataset:
    """Deep copy of a source header, re-identified for one series (pixels handled elsewhere)."""
    ds = copy.deepcopy(src)
    for kw in _DROP:
        if kw in ds:
            delattr(ds, kw)
    study.remap(ds)
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.PatientBirthDate = study.birth
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyID = f"B{study.seed}"
    ds.StudyDescription = f"Accelerator benchmark ({study.kind})"
    ds.AccessionNumber = study.accession
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = study.date
    if "AcquisitionDate" in ds:
        ds.AcquisitionDate = study.date
    ds.StudyTime = "120000"
    ds.SeriesTime = f"12{series_number % 60:02d}00"
    ds.SeriesInstanceUID = study.uid("series", series_number)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.InstitutionName = "ACCELERATOR BENCH"
    ds.ImageComments = f"Derived from {source} ({NAMESPACE})"
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    for kw in _DROP_META:
        if kw in meta:
            delattr(meta, kw)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


def _uncompressed_template(ds: Dataset, rows: int, cols: int, frames: int, max_value: int,
                           src_rows: int) -> Dataset:
    """Adapt a header to freshly computed pixels, which ``_write`` appends after it."""
    for tag in [t for t in ds.keys() if t >= PIXEL_DATA]:
        del ds[tag]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, cols
    if "PixelSpacing" in ds and src_rows != rows:       # same field of view, finer pixels
        ds.PixelSpacing = [f"{float(v) * src_rows / rows:.6g}" for v in ds.PixelSpacing]
    bits = max(int(ds.get("BitsStored", 16)), max_value.bit_length())
    ds.BitsStored, ds.HighBit = bits, bits - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _set_instance(ds: Dataset, study: _Study, sop_uid: str, number: int) -> None:
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    ds.ContentTime = ds.InstanceCreationTime = f"12{(number // 60) % 60:02d}{number % 60:02d}"


def _encode_header(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_element_header(length: int) -> bytes:
    """Explicit VR little endian (7FE0,0010) OW header: lets big pixel data stream to disk."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


# --------------------------------------------------------------------------- planning

@dataclass
class _Instance:
    relpath: str
    header: bytes                       # complete file if pixels is None
    pixels: Iterable[bytes] | None      # uncompressed frames appended as (7FE0,0010) OW
    pixel_length: int
    meta: dict                          # identifiers for the manifest, snapshotted
    source: str
    frames: int


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _uncompressed_instance(study: _Study, tmpl: Dataset, relpath: str, number: int, source: str,
                           frames: Iterable[bytes], nframes: int, frame_bytes: int,
                           role: tuple) -> _Instance:
    _set_instance(tmpl, study, study.uid("sop", *role), number)
    header = _encode_header(tmpl)
    length = nframes * frame_bytes
    return _Instance(relpath, header + _pixel_element_header(length), frames, length, _snapshot(tmpl),
                     source, nframes)


def _plan_ct(study: _Study, instances: int, matrix: int) -> Iterator[_Instance]:
    name = "CT_small.dcm"
    src = _source(name)
    varier = _Varier(study.key, matrix, matrix)
    descriptions = ("Axial 5mm STANDARD", "Axial 5mm LUNG", "Axial 5mm BONE")
    g = 0
    for k, count in enumerate(_split(instances, min(3, instances))):
        base = _base_image(name, 0, matrix, matrix, k % 4)
        tmpl = _series_template(study, src, series_number=k + 1, description=descriptions[k % 3],
                                source=name)
        tmpl = _uncompressed_template(tmpl, matrix, matrix, 1, base.max_value + NOISE_MAX + WAVE_AMP,
                                      src.Rows)
        thickness = float(src.get("SliceThickness", 5) or 5)
        x0, y0, z0 = (float(v) for v in src.ImagePositionPatient)
        for s in range(count):
            z = round(z0 - s * thickness, 4)
            tmpl.ImagePositionPatient = [f"{x0:g}", f"{y0:g}", f"{z:g}"]
            tmpl.SliceLocation = f"{z:g}"
            pixels = varier.frame(base, g)
            yield _uncompressed_instance(study, tmpl, f"series{k + 1:02d}/ct{s + 1:05d}.dcm", s + 1, name,
                                         [pixels], 1, len(pixels), ("ct", k, s))
            g += 1


def _plan_mr(study: _Study, instances: int, matrix: int) -> Iterator[_Instance]:
    """Three series of real MR images resized to matrix x matrix; the multi-frame source gives
    one slice per frame, cycled. Slices vary like the CT's, with MR's lower noise."""
    for k, count in enumerate(_split(instances, min(len(MR_LAYOUT), instances))):
        pix_name, hdr_name, description = MR_LAYOUT[k]
        src = _source(hdr_name)
        nframes = len(_frames_of(pix_name)[2])
        bases = [_base_image(pix_name, f, matrix, matrix, 0) for f in range(nframes)]
        varier = _Varier(f"{study.key}|mr{k}", matrix, matrix, MR_NOISE_TABLE)
        tmpl = _series_template(study, src, series_number=k + 1, description=f"{description} from {pix_name}",
                                source=pix_name)
        if "NumberOfFrames" in tmpl:  # a frame of a multi-frame source becomes one slice
            del tmpl.NumberOfFrames
        tmpl = _uncompressed_template(tmpl, matrix, matrix, 1,
                                      max(b.max_value for b in bases) + MR_NOISE_MAX + WAVE_AMP, src.Rows)
        for s in range(count):
            pixels = varier.frame(bases[s % nframes], s)
            yield _uncompressed_instance(study, tmpl, f"series{k + 1:02d}/mr{s + 1:05d}.dcm", s + 1, pix_name,
                                         [pixels], 1, len(pixels), ("mr", k, s))


def _plan_small(study: _Study, instances: int) -> Iterator[_Instance]:
    counts = _split(instances, min(len(SMALL_LAYOUT), instances))
    for k, count in enumerate(counts):
        name, m = SMALL_LAYOUT[k % len(SMALL_LAYOUT)]
        src = _source(name)
        base = _base_image(name, 0, m, m, k % 4)
        varier = _Varier(f"{study.key}|series{k}", m, m)
        modality = src.Modality
        tmpl = _series_template(study, src, series_number=k + 1,
                                description=f"{modality} {m}x{m} from {name}", source=name)
        tmpl = _uncompressed_template(tmpl, m, m, 1, base.max_value + NOISE_MAX + WAVE_AMP, src.Rows)
        for s in range(count):
            pixels = varier.frame(base, s)
            yield _uncompressed_instance(study, tmpl, f"series{k + 1:02d}/im{s + 1:05d}.dcm", s + 1, name,
                                         [pixels], 1, len(pixels), ("small", k, s))


def _plan_large(study: _Study, instances: int, frames: int, matrix: int) -> Iterator[_Instance]:
    varier = _Varier(study.key, matrix, matrix)
    for i in range(instances):
        pix_name, hdr_name = LARGE_LAYOUT[i % len(LARGE_LAYOUT)]
        src = _source(hdr_name)
        nsrc = len(_frames_of(pix_name)[2])
        bases = [_base_image(pix_name, f, matrix, matrix, i % 4) for f in range(nsrc)]
        peak = max(b.max_value for b in bases) + NOISE_MAX + WAVE_AMP
        tmpl = _series_template(study, src, series_number=i + 1,
                                description=f"{frames} frames {matrix}x{matrix} from {pix_name}",
                                source=pix_name)
        tmpl.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7.3")   # Multi-frame Grayscale Word SC
        tmpl.file_meta.MediaStorageSOPClassUID = tmpl.SOPClassUID
        tmpl.ConversionType = "WSD"
        tmpl = _uncompressed_template(tmpl, matrix, matrix, frames, peak, src.Rows)
        tmpl.NumberOfFrames = frames

        def gen(bases=bases):
            for f in range(frames):
                yield varier.frame(bases[f % len(bases)], f)

        yield _uncompressed_instance(study, tmpl, f"series{i + 1:02d}/mf{i + 1:03d}.dcm", 1, pix_name,
                                     gen(), frames, matrix * matrix * 2, ("large", i))


def _plan_jpeg(study: _Study, instances: int) -> Iterator[_Instance]:
    n = len(JPEG_SOURCES)
    templates: dict[int, Dataset] = {}
    for k in range(min(n, instances)):
        name = JPEG_SOURCES[k]
        src = _source(name)
        if not src.file_meta.TransferSyntaxUID.is_compressed:
            raise ValueError(f"{name} is not compressed")
        templates[k] = _series_template(study, src, series_number=k + 1,
                                        description=f"{src.file_meta.TransferSyntaxUID.name} {name}",
                                        source=name)
    for i in range(instances):
        k, copy_no = i % n, i // n
        tmpl = templates[k]
        _set_instance(tmpl, study, study.uid("sop", "jpeg", k, copy_no), copy_no + 1)
        data = _encode_header(tmpl)
        yield _Instance(f"series{k + 1:02d}/im{copy_no + 1:05d}.dcm", data, None, 0, _snapshot(tmpl), JPEG_SOURCES[k],
                        int(tmpl.get("NumberOfFrames", 1) or 1))


def _resolve(kind: str, instances: int | None, frames: int | None, matrix: int | None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    d = DEFAULTS[kind]
    if frames is not None and "frames" not in d:
        raise ValueError("--frames applies to 'large' only")
    if matrix is not None and "matrix" not in d:
        raise ValueError("--matrix applies to 'ct', 'mr' and 'large' only")
    params = {"instances": d["instances"] if instances is None else instances}
    if "frames" in d:
        params["frames"] = d["frames"] if frames is None else frames
    if "matrix" in d:
        params["matrix"] = d["matrix"] if matrix is None else matrix
    for k, v in params.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive integer")
    if params.get("matrix", 64) < 16:
        raise ValueError("matrix must be >= 16")
    return params


def _plan(kind: str, seed: int, params: dict) -> tuple[_Study, Iterator[_Instance]]:
    study = _Study(kind, seed, params)
    n = params["instances"]
    if kind == "ct":
        it = _plan_ct(study, n, params["matrix"])
    elif kind == "small":
        it = _plan_small(study, n)
    elif kind == "large":
        it = _plan_large(study, n, params["frames"], params["matrix"])
    elif kind == "mr":
        it = _plan_mr(study, n, params["matrix"])
    else:
        it = _plan_jpeg(study, n)
    return study, it


def _sources_for(kind: str, params: dict) -> list[str]:
    if kind == "ct":
        return ["CT_small.dcm"]
    if kind == "small":
        return sorted({s for s, _ in SMALL_LAYOUT[:min(len(SMALL_LAYOUT), params["instances"])]})
    if kind == "mr":
        return sorted({src for layout in MR_LAYOUT[:min(len(MR_LAYOUT), params["instances"])] for src in layout[:2]})
    if kind == "large":
        used = LARGE_LAYOUT[:min(len(LARGE_LAYOUT), params["instances"])]
        return sorted({s for pair in used for s in pair})
    return sorted(JPEG_SOURCES[:min(len(JPEG_SOURCES), params["instances"])])


def _snapshot(ds: Dataset) -> dict:
    return {"PatientID": str(ds.PatientID), "StudyInstanceUID": str(ds.StudyInstanceUID),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID), "SOPInstanceUID": str(ds.SOPInstanceUID),
            "SOPClassUID": str(ds.SOPClassUID), "TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID),
            "SeriesNumber": int(ds.SeriesNumber), "InstanceNumber": int(ds.InstanceNumber)}


def _entry(inst: _Instance, size: int, md5: str) -> ManifestFile:
    return ManifestFile(path=inst.relpath, size=size, md5=md5, NumberOfFrames=inst.frames,
                        source=inst.source, **inst.meta)


def _chunks(inst: _Instance) -> Iterator[bytes]:
    yield inst.header
    if inst.pixels is not None:
        written = 0
        for chunk in inst.pixels:
            written += len(chunk)
            yield chunk
        if written != inst.pixel_length:
            raise AssertionError(f"{inst.relpath}: wrote {written} pixel bytes, declared {inst.pixel_length}")


# --------------------------------------------------------------------------- public API

def generate_study(kind: str, out_dir: Path, *, instances: int | None = None, seed: int = 1,
                   frames: int | None = None, matrix: int | None = None) -> StudyManifest:
    """Write one study of ``kind`` under ``out_dir`` (plus ``manifest.json``) and describe it.

    ``frames``/``matrix`` size the "large" kind (and ``matrix`` the "ct" kind) so tests can use
    tiny versions. Existing files at the same paths are overwritten; other files are left alone,
    the manifest is authoritative. Pixel data is streamed, so memory stays at a few frames.
    """
    params = _resolve(kind, instances, frames, matrix)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study, plan = _plan(kind, seed, params)
    manifest = StudyManifest(kind=kind, seed=seed, params=params, PatientID=study.patient_id,
                             StudyInstanceUID=study.study_uid,
                             sources={s: _source_md5(s) for s in _sources_for(kind, params)},
                             root=out_dir)
    for inst in plan:
        path = out_dir / inst.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        md5, size = hashlib.md5(), 0
        with open(path, "wb") as f:
            for chunk in _chunks(inst):
                md5.update(chunk)
                size += len(chunk)
                f.write(chunk)
        manifest.files.append(_entry(inst, size, md5.hexdigest()))
    manifest.write(out_dir)
    return manifest


def iter_study_files(kind: str, *, instances: int | None = None, seed: int = 1, frames: int | None = None,
                     matrix: int | None = None) -> Iterator[tuple[ManifestFile, bytes]]:
    """The same files as ``generate_study``, in memory and without touching the disk.

    Handy to feed a daemon directly; each item is a whole file (so > 100 MB for "large").
    """
    params = _resolve(kind, instances, frames, matrix)
    _, plan = _plan(kind, seed, params)
    for inst in plan:
        data = b"".join(_chunks(inst))
        yield _entry(inst, len(data), hashlib.md5(data).hexdigest()), data


def ensure_study(kind: str, out_dir: Path, *, instances: int | None = None, seed: int = 1,
                 frames: int | None = None, matrix: int | None = None, verify_md5: bool = False) -> StudyManifest:
    """Reuse a cached study in ``out_dir`` if it matches the arguments, else (re)generate it.

    Generation goes to a sibling temp directory renamed into place, so an interrupted run never
    leaves a half study that looks complete. Only a directory holding one of our manifests is
    ever deleted.
    """
    params = _resolve(kind, instances, frames, matrix)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            raw = json.loads((out_dir / MANIFEST_NAME).read_text())
            ours = isinstance(raw, dict) and str(raw.get("generator", "")).startswith("bench.datasets")
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FileExistsError(f"{out_dir} is not empty and holds no manifest of ours: not touching it")
        try:
            m = StudyManifest.from_dict(raw, root=out_dir)
            ok = (m.generator == GENERATOR and m.kind == kind and m.seed == seed and m.params == params
                  and all(p.is_file() and p.stat().st_size == f.size for p, f in zip(m.paths(), m.files)))
            if ok and verify_md5:
                ok = all(_file_md5(p) == f.md5 for p, f in zip(m.paths(), m.files))
            if ok:
                return m
        except (ValueError, KeyError, TypeError):
            pass                                    # an older format of ours: regenerate
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_study(kind, tmp, instances=params["instances"], seed=seed, frames=params.get("frames"),
                   matrix=params.get("matrix"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return load_manifest(out_dir)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.datasets", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--instances", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--frames", type=int, help="frames per instance ('large' only)")
    ap.add_argument("--matrix", type=int, help="rows = columns ('ct', 'mr' and 'large' only)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = generate_study(a.kind, a.outdir, instances=a.instances, seed=a.seed, frames=a.frames, matrix=a.matrix)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    dt = time.perf_counter() - t0
    sizes = [f.size for f in m.files]
    print(f"{a.kind}: {len(m.files)} files, {m.total_bytes / 1e6:.1f} MB "
          f"(min {min(sizes)} / max {max(sizes)} bytes) in {dt:.1f} s -> {a.outdir}")
    print(f"PatientID {m.PatientID}  StudyInstanceUID {m.StudyInstanceUID}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
