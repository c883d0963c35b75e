"""The "shuffle-zstd" bucket codec spoken between two accelerator daemons (never to the plugin).

Why not gzip: a bucket is mostly 16-bit little-endian pixel data, where deflate sees two
interleaved byte streams of very different statistics and codes neither well. Separating the byte
planes (shuffle), after replacing each 16-bit word by its zigzag-coded difference from the
previous one (so smooth images become small numbers whose high plane is almost all zeros), lets
zstd's entropy coder reach far better ratios at several times gzip-6's speed (bench/codecs.py).

Payload = MAGIC, then blocks of at most BLOCK raw bytes, each `mode, raw_len, comp_len, crc32`
(little-endian, 13 bytes) and `comp_len` bytes. The mode is chosen per block by content: each
candidate transform is tried on a sample of the block and the smallest wins; data that does not
compress (JPEG / JPEG 2000 pixel data) is STORED as it is. Blocks let the receiver decode as the
payload streams in, keep memory at one block, and adapt within a bucket (a header, then pixels).

Decoding trusts nothing: every length is checked against the bucket's expected size before any
allocation (a zstd frame must declare exactly `raw_len`, so nothing inflates beyond it), and the
CRC-32 of each decoded block is checked, so a corrupt payload fails as NetworkProtocol at once and
the puller fetches the bucket again (the per-instance MD5 still checks the whole). Decoded words
are restored exactly: the transforms are bijections on bytes.

numpy does the word arithmetic; without it the codec is simply not offered (`AVAILABLE`).
"""

from __future__ import annotations

import struct
import threading
import zlib

import zstandard

from protocol.errors import NetworkProtocol

try:
    import numpy as _np
except ImportError:  # pragma: no cover - then the codec is not advertised to peers
    _np = None

try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover
    _crc32 = zlib.crc32

AVAILABLE = _np is not None
MAGIC = b"ASZ1"
BLOCK = 1 << 20  # raw bytes per block: fine-grained choice, streaming decode, bounded memory
SAMPLE = 64 * 1024  # bytes of a block each candidate transform is tried on
STORE_ABOVE = 0.97  # compressed/raw ratio of the best candidate above which a block is stored
DEFAULT_LEVEL = 1
MIN_LEVEL, MAX_LEVEL = 1, 19
_HEADER = struct.Struct("<BIII")  # mode, raw_len, comp_len, crc32

STORED, ZSTD, SHUFFLE, DELTA = 0, 1, 2, 3  # block modes
MODES = (STORED, ZSTD, SHUFFLE, DELTA)
_MAX_COMPRESSED = BLOCK + BLOCK // 64 + 1024  # zstd's worst-case expansion of one block is far below

_local = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


# (wire bytes per second at least, level): a fast link wants a cheap level (the CPU is the limit),
# a slow one the best ratio the CPUs can still feed it with (bench/codecs.py).
SPEED_LEVELS = ((40e6, 1), (8e6, 3), (0.0, 6))


def level_for_speed(wire_bytes_per_second: float | None) -> int:
    """The zstd level for a link moving this many payload bytes per second (None: not known yet)."""
    if wire_bytes_per_second is None:
        return DEFAULT_LEVEL
    return next(level for floor, level in SPEED_LEVELS if wire_bytes_per_second >= floor)


def clamp_level(level: int | None) -> int:
    return DEFAULT_LEVEL if level is None else max(MIN_LEVEL, min(MAX_LEVEL, int(level)))


# --------------------------------------------------------------------------- transforms


def _shuffle(data: bytes) -> bytes:
    """Even bytes, then odd bytes (the two planes of little-endian 16-bit words)."""
    return data[0::2] + data[1::2]


def _unshuffle(data: bytes) -> bytes:
    half = (len(data) + 1) // 2
    out = bytearray(len(data))
    out[0::2] = data[:half]
    out[1::2] = data[half:]
    return bytes(out)


def _delta(data: bytes) -> bytes:
    """Zigzag of the difference of each 16-bit word from the previous one, then shuffled; an odd
    trailing byte is kept as it is."""
    even = len(data) & ~1
    words = _np.frombuffer(data, dtype="<u2", count=even // 2)
    diff = _np.empty_like(words)
    if len(words):
        diff[0] = words[0]
        _np.subtract(words[1:], words[:-1], out=diff[1:])
    signed = diff.view("<i2")
    zigzag = ((signed << 1) ^ (signed >> 15)).view("<u2")
    planes = zigzag.view(_np.uint8).reshape(-1, 2).T
    return planes.tobytes() + data[even:]


def _undelta(data: bytes) -> bytes:
    even = len(data) & ~1
    count = even // 2
    planes = _np.frombuffer(data, dtype=_np.uint8, count=even).reshape(2, count)
    zigzag = planes[1].astype("<u2")
    zigzag <<= 8
    zigzag |= planes[0]
    diff = zigzag >> 1
    diff ^= _np.negative(zigzag & 1)  # unsigned: 0 or 0xFFFF, the sign the zigzag folded in
    words = _np.cumsum(diff, dtype="<u2")  # wraps modulo 2**16: the inverse of the difference
    return words.tobytes() + data[even:]


_FORWARD = {ZSTD: lambda d: d, SHUFFLE: _shuffle, DELTA: _delta}
_INVERSE = {ZSTD: lambda d: d, SHUFFLE: _unshuffle, DELTA: _undelta}


def choose_mode(block: bytes | memoryview) -> int:
    """The transform whose zstd-1 output is smallest on a sample from the block's middle (its
    start is often a DICOM header); STORED when even the best saves less than 3 %."""
    if len(block) <= SAMPLE:
        sample = bytes(block)
    else:
        start = ((len(block) - SAMPLE) // 2) & ~1  # even: keep 16-bit words aligned
        sample = bytes(block[start:start + SAMPLE])
    if not sample:
        return STORED
    fast = _compressor(1)
    sizes = {mode: len(fast.compress(_FORWARD[mode](sample))) for mode in (ZSTD, SHUFFLE, DELTA)}
    mode = min(sizes, key=sizes.__getitem__)
    return STORED if sizes[mode] > STORE_ABOVE * len(sample) else mode


# --------------------------------------------------------------------------- encoding


def encode_block(block: bytes, level: int = DEFAULT_LEVEL, mode: int | None = None) -> bytes:
    """One block (at most BLOCK bytes) with its header."""
    if len(block) > BLOCK:
        raise ValueError("block too large")
    if mode is None:
        mode = choose_mode(block)
    body = block if mode == STORED else _compressor(level).compress(_FORWARD[mode](block))
    if mode != STORED and len(body) >= len(block):
        mode, body = STORED, block  # the sample lied: never expand
    return _HEADER.pack(mode, len(block), len(body), _crc32(block)) + body


class Encoder:
    """Incremental encoder: `encode` pieces of any size, then `finish`. Blocks are cut at BLOCK
    raw bytes whatever the pieces, so the payload does not depend on how the bucket was read."""

    def __init__(self, level: int | None = None):
        self.level = clamp_level(level)
        self._pending = bytearray()
        self._started = False

    def encode(self, piece: bytes | bytearray | memoryview) -> bytes:
        out = [] if self._started else [MAGIC]
        self._started = True
        self._pending += piece
        if len(self._pending) >= BLOCK:
            full = len(self._pending) - len(self._pending) % BLOCK
            view = bytes(self._pending[:full])
            del self._pending[:full]
            out.extend(encode_block(view[i:i + BLOCK], self.level) for i in range(0, full, BLOCK))
        return b"".join(out)

    def finish(self) -> bytes:
        out = [] if self._started else [MAGIC]
        self._started = True
        if self._pending:
            out.append(encode_block(bytes(self._pending), self.level))
            self._pending = bytearray()
        return b"".join(out)


def encode(data: bytes | bytearray | memoryview, level: int | None = None) -> bytes:
    encoder = Encoder(level)
    return encoder.encode(data) + encoder.finish()


# --------------------------------------------------------------------------- decoding


class StreamDecoder:
    """Incremental, bounded decoder: `feed` returns the raw bytes of the blocks completed so
    far, `finish` checks that the payload ended exactly at `expected_size` raw bytes.

    Input held at once is at most one block's header and body; output never exceeds
    `expected_size` (each block's declared size is checked before it is decoded).
    """

    def __init__(self, expected_size: int):
        if expected_size < 0:
            raise ValueError("expected_size must be >= 0")
        self.expected_size = expected_size
        self.produced = 0
        self._buffer = bytearray()
        self._magic = False
        self._header: tuple[int, int, int, int] | None = None

    def feed(self, piece: bytes | bytearray | memoryview) -> bytes:
        self._buffer += piece
        out: list[bytes] = []
        while True:
            if not self._magic:
                if len(self._buffer) < len(MAGIC):
                    break
                if bytes(self._buffer[:len(MAGIC)]) != MAGIC:
                    raise NetworkProtocol("Not a shuffle-zstd payload (bad magic)")
                del self._buffer[:len(MAGIC)]
                self._magic = True
            if self._header is None:
                if len(self._buffer) < _HEADER.size:
                    break
                self._header = self._check_header(*_HEADER.unpack_from(self._buffer))
                del self._buffer[:_HEADER.size]
            comp_len = self._header[2]
            if len(self._buffer) < comp_len:
                break
            body = bytes(self._buffer[:comp_len])
            del self._buffer[:comp_len]
            out.append(self._decode(body))
            self._header = None
        return b"".join(out)

    def _check_header(self, mode: int, raw_len: int, comp_len: int, crc: int) -> tuple[int, int, int, int]:
        if mode not in MODES:
            raise NetworkProtocol(f"Corrupted shuffle-zstd payload: unknown block mode {mode}")
        if not 0 < raw_len <= BLOCK:
            raise NetworkProtocol(f"Corrupted shuffle-zstd payload: block of {raw_len} bytes")
        if self.produced + raw_len > self.expected_size:
            raise NetworkProtocol(f"Shuffle-zstd payload decodes beyond the expected {self.expected_size} bytes")
        if comp_len > (raw_len if mode == STORED else _MAX_COMPRESSED):
            raise NetworkProtocol(f"Corrupted shuffle-zstd payload: block body of {comp_len} bytes")
        return mode, raw_len, comp_len, crc

    def _decode(self, body: bytes) -> bytes:
        mode, raw_len, _, crc = self._header  # type: ignore[misc]
        if mode == STORED:
            data = body
        else:
            try:
                if zstandard.frame_content_size(body) != raw_len:  # before any allocation
                    raise NetworkProtocol("Corrupted shuffle-zstd payload: zstd frame of the wrong size")
                inflater = _decompressor().decompressobj()
                data = inflater.decompress(body)
                if not inflater.eof or inflater.unused_data:
                    raise NetworkProtocol("Corrupted shuffle-zstd payload: zstd frame cut short or followed by garbage")
            except zstandard.ZstdError as error:
                raise NetworkProtocol(f"Corrupted shuffle-zstd payload: {error}") from error
            if len(data) != raw_len:
                raise NetworkProtocol("Corrupted shuffle-zstd payload: zstd frame of the wrong size")
            data = _INVERSE[mode](data)
        if _crc32(data) != crc:
            raise NetworkProtocol("Corrupted shuffle-zstd payload: CRC-32 mismatch")
        self.produced += raw_len
        return data

    def finish(self) -> None:
        if not self._magic or self._header is not None or self._buffer:
            raise NetworkProtocol("Truncated shuffle-zstd payload")
        if self.produced != self.expected_size:
            raise NetworkProtocol(f"Decompressed bucket size {self.produced} != {self.expected_size}")


def decode(payload: bytes, expected_size: int) -> bytes:
    decoder = StreamDecoder(expected_size)
    data = decoder.feed(payload)
    decoder.finish()
    return data
