"""Compare the gzip implementations we could use for bucket payloads, on real DICOM bytes.

Buckets of exactly 4 MiB (the default BucketSize) are built by concatenating the uncompressed
test files shipped with pydicom and pydicom-data, grouped by modality the way a real study would
arrive. Each codec/level compresses and decompresses every bucket 5 times on one thread; the table
shows the median, as input (uncompressed) MB/s, and the size ratio compressed/original.

The second part, `--studies`, is the table of the negotiated codec (protocol/shuffle_zstd.py)
against gzip-6 on the benchmark's own studies (bench/datasets.py: CT, MR and the JPEG one, cut in
4 MiB buckets in the order a transfer reads them): ratio, ratio relative to gzip-6's, compress and
decompress MB/s of raw bytes on one thread (median of RUNS), and CPU seconds per GB each way.
Every payload is decoded and compared with its bucket (and the gzip ones by the stdlib).

Usage:  python bench/codecs.py            (about 30-60 s; prints markdown tables)
        python bench/codecs.py --studies [--ct N] [--mr N] [--jpeg N]   (the codec table only)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import isal.isal_zlib as isal_zlib
import pydicom
try:
    import zlib_ng.zlib_ng as zlibng
except ImportError:  # optional: its rows are left out
    zlibng = None

if __package__ in (None, ""):  # `python bench/codecs.py`: make `bench` and `protocol` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import ensure_study  # noqa: E402
from protocol import shuffle_zstd  # noqa: E402

BUCKET = 4 * 1024 * 1024
RUNS = 5
GZIP_WBITS = 31  # deflate + gzip header/trailer, one member

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# Uncompressed transfer syntaxes only (explicit/implicit little endian, big endian).
UNCOMPRESSED_SETS = {
    "CT/MR": ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "693_UNCR.dcm",
              "eCT_Supplemental.dcm", "MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"],
    "CR": ["RG1_UNCR.dcm"],
    "US": ["US1_UNCR.dcm", "OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm", "color-px.dcm",
           "examples_palette.dcm", "examples_rgb_color.dcm"],
}
# Already-compressed pixel data (JPEG baseline, JPEG 2000, JPEG lossless): reported separately.
JPEG_SET = {
    "JPEG/J2K": ["color3d_jpeg_baseline.dcm", "RG1_J2KR.dcm", "MR2_J2KR.dcm", "693_J2KR.dcm",
                 "US1_J2KR.dcm", "JPEG-LL.dcm"],
}


def data_store() -> Path | None:
    """pydicom-data keeps the large files in site-packages/data_store/data."""
    try:
        import data_store  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(data_store.__file__).parent / "data"
    return path if path.is_dir() else None


def find(name: str) -> Path | None:
    for folder in (TEST_FILES, data_store()):
        if folder is not None and (folder / name).is_file():
            return folder / name
    return None


def make_bucket(names: list[str]) -> bytes | None:
    """Concatenate the files (cycling) and cut exactly one bucket, as the planner would."""
    blobs = [p.read_bytes() for p in map(find, names) if p is not None]
    if not blobs:
        return None
    out = bytearray()
    while len(out) < BUCKET:
        for blob in blobs:
            out += blob
    return bytes(out[:BUCKET])


def codecs() -> list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    def zlib_family(module, level):
        def compress(data: bytes) -> bytes:
            c = module.compressobj(level, module.DEFLATED, GZIP_WBITS)
            return c.compress(data) + c.flush()

        def decompress(data: bytes) -> bytes:
            return module.decompress(data, GZIP_WBITS)

        return compress, decompress

    rows = []
    for level in (1, 6, 9):
        rows.append((f"zlib {zlib.ZLIB_RUNTIME_VERSION} level {level}", *zlib_family(zlib, level)))
    for level in (0, 1, 2, 3):
        rows.append((f"isal level {level}", *zlib_family(isal_zlib, level)))
    for level in (1, 2, 6) if zlibng is not None else ():
        rows.append((f"zlib-ng {zlibng.ZLIBNG_VERSION} level {level}", *zlib_family(zlibng, level)))
    return rows


def median_seconds(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(buckets: list[bytes]) -> list[tuple[str, float, float, float]]:
    total = sum(map(len, buckets))
    rows = []
    for name, compress, decompress in codecs():
        c_time = d_time = 0.0
        packed = 0
        for bucket in buckets:
            payload = compress(bucket)
            assert zlib.decompress(payload, GZIP_WBITS) == bucket  # stdlib reads it: interoperable
            packed += len(payload)
            c_time += median_seconds(lambda: compress(bucket))
            d_time += median_seconds(lambda: decompress(payload))
        rows.append((name, total / c_time / 1e6, total / d_time / 1e6, packed / total))
    return rows


def cross_decode(buckets: list[bytes]) -> list[tuple[str, float]]:
    """What a receiver sees from a real plugin: zlib level 6 streams, decoded by each library."""
    total = sum(map(len, buckets))
    payloads = [zlib.compress(b, 6, wbits=GZIP_WBITS) for b in buckets]
    rows = []
    for name, module in (("zlib", zlib), ("isal", isal_zlib), ("zlib-ng", zlibng)):
        if module is None:
            continue
        seconds = sum(median_seconds(lambda: module.decompress(p, GZIP_WBITS)) for p in payloads)
        rows.append((name, total / seconds / 1e6))
    return rows


def table(title: str, buckets: list[bytes]) -> str:
    lines = [f"### {title}: {len(buckets)} bucket(s) of 4 MiB, median of {RUNS} runs, 1 thread", "",
             "| codec | compress MB/s | decompress MB/s | ratio (compressed/original) |",
             "|---|---:|---:|---:|"]
    for name, c, d, ratio in measure(buckets):
        lines.append(f"| {name} | {c:.0f} | {d:.0f} | {ratio:.3f} |")
    return "\n".join(lines)


DATA_DIR = Path(__file__).resolve().parent / "data"
STUDY_SIZES = {"ct": 40, "mr": 160, "jpeg": 80}  # instances: ~21 MB of CT, ~21 MB of MR, ~12 MB JPEG
TARGETS = {"ratio_vs_gzip6": 1.35, "compress": 150.0, "decompress": 300.0}


def study_buckets(kind: str, instances: int) -> list[bytes]:
    """A bench study's files in Orthanc-ID order (as a transfer plans them), cut in 4 MiB."""
    manifest = ensure_study(kind, DATA_DIR / f"{kind}-{instances}-seed1", instances=instances)
    ordered = sorted(zip(manifest.files, manifest.paths()), key=lambda fp: fp[0].orthanc_ids()["instance"])
    blob = b"".join(path.read_bytes() for _, path in ordered)
    return [blob[i:i + BUCKET] for i in range(0, len(blob), BUCKET)]


def study_codecs() -> list[tuple[str, Callable[[bytes], bytes], Callable[[bytes, int], bytes]]]:
    def gzip_with(module, level):
        return (lambda b: module.compress(b, level, GZIP_WBITS) if module is not zlib
                else zlib.compress(b, level, wbits=GZIP_WBITS),
                lambda p, n: module.decompress(p, GZIP_WBITS))

    rows = [("gzip-6 (zlib, the plugin's)", *gzip_with(zlib, 6)),
            ("gzip isal-2 (ours to a plugin)", *gzip_with(isal_zlib, 2))]
    for level in (1, 3, 6):
        rows.append((f"shuffle-zstd level {level}", lambda b, lv=level: shuffle_zstd.encode(b, lv),
                     shuffle_zstd.decode))
    return rows


def study_table(sizes: dict[str, int]) -> tuple[str, bool]:
    """The codec table on the bench studies, and whether every target is met."""
    lines = [f"### Negotiated codec vs gzip-6 on the bench studies: 4 MiB buckets, median of {RUNS} runs, "
             "1 thread", "",
             "| study | codec | ratio | × gzip-6's ratio | compress MB/s | decompress MB/s "
             "| CPU s/GB compress | CPU s/GB decompress |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for kind, instances in sizes.items():
        if not instances:
            continue
        buckets = study_buckets(kind, instances)
        total = sum(map(len, buckets))
        gzip6 = None
        for name, compress, decompress in study_codecs():
            c_time = d_time = 0.0
            packed = 0
            for bucket in buckets:
                payload = compress(bucket)
                assert decompress(payload, len(bucket)) == bucket, (kind, name)
                packed += len(payload)
                c_time += median_seconds(lambda: compress(bucket))
                d_time += median_seconds(lambda: decompress(payload, len(bucket)))
            ratio = total / packed
            gzip6 = gzip6 or ratio
            c_speed, d_speed = total / c_time / 1e6, total / d_time / 1e6
            lines.append(f"| {kind} ({instances}, {total / 1e6:.0f} MB) | {name} | {ratio:.2f} | "
                         f"{ratio / gzip6:.2f} | {c_speed:.0f} | {d_speed:.0f} | {1000 / c_speed:.1f} | "
                         f"{1000 / d_speed:.1f} |")
            if name.startswith("shuffle-zstd level 1") and kind in ("ct", "mr"):
                ok &= (ratio / gzip6 >= TARGETS["ratio_vs_gzip6"] and c_speed >= TARGETS["compress"]
                       and d_speed >= TARGETS["decompress"])
    lines += ["", f"Targets (CT and MR, level 1, the fast-link level): ratio ≥ {TARGETS['ratio_vs_gzip6']}× "
              f"gzip-6's, compress ≥ {TARGETS['compress']:.0f} MB/s, decompress ≥ "
              f"{TARGETS['decompress']:.0f} MB/s: {'met' if ok else 'NOT met'}"]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--studies" in args:
        sizes = dict(STUDY_SIZES)
        for kind in sizes:
            if f"--{kind}" in args:
                sizes[kind] = int(args[args.index(f"--{kind}") + 1])
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU(s), zstd {shuffle_zstd.zstandard.ZSTD_VERSION}\n")
        text, ok = study_table(sizes)
        print(text)
        return 0 if ok else 1
    started = time.perf_counter()
    main_buckets = {k: make_bucket(v) for k, v in UNCOMPRESSED_SETS.items()}
    jpeg_buckets = {k: make_bucket(v) for k, v in JPEG_SET.items()}
    present = [b for b in main_buckets.values() if b]
    if not present:
        print("no DICOM test files found (install pydicom and pydicom-data)", file=sys.stderr)
        return 1
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); "
          f"uncompressed sets: {', '.join(k for k, v in main_buckets.items() if v)}\n")
    print(table("Uncompressed DICOM (CT/MR, CR, US)", present))
    print()
    for name, bucket in main_buckets.items():
        if bucket:
            print(table(f"{name} only", [bucket]))
            print()
    jpeg = [b for b in jpeg_buckets.values() if b]
    if jpeg:
        print(table("JPEG / JPEG 2000 compressed DICOM", jpeg))
        print()
    print("### Decoding a zlib level 6 stream (what the real plugin sends)\n")
    print("| decoder | decompress MB/s |\n|---|---:|")
    for name, speed in cross_decode(present):
        print(f"| {name} | {speed:.0f} |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
