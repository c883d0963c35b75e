"""Bucket payload encodings: "none" and "gzip" as ONE gzip member (spec 6.3).

Any standard gzip decoder reads what we send, and we read any single-member gzip stream. We
compress with ISA-L at level 2 (python-isal): on 4 MiB buckets of uncompressed DICOM it runs 13-18x
faster than zlib level 6 (300-450 MB/s vs 25) for 96 % of its size reduction (bench/codecs.py), so
the CPU stops being the bottleneck on fast links; level 1 is barely faster but up to 8 % bigger,
level 0 expands incompressible pixel data, level 3 is half as fast for the same size. ISA-L also inflates
about 1.5x faster than zlib. The stdlib zlib (level 6) is the fallback where python-isal is not
installed; the output stays interoperable.

Decoding never trusts the peer: output is bounded by the size the bucket plan expects (at most
`expected_size + 1` bytes are ever inflated, so a gzip bomb costs nothing), and a corrupt,
truncated, multi-member or trailing-garbage payload, or one of the wrong length, raises
`NetworkProtocol` (500), as the plugin does for a wrong decompressed size.

Between two accelerator daemons a third encoding, "shuffle-zstd" (protocol/shuffle_zstd.py), is
used once negotiated. `level` is the encoding's level, chosen by a sender from the link's speed
(`level_for_speed`): zstd's for shuffle-zstd, deflate's for gzip (ISA-L for 0-3, zlib above; the
output is one standard gzip member either way); None keeps the defaults. The shuffle-zstd decoder
is bounded and exact in the same way.

The functions are pure and thread-safe (a decoder object is the state of one request); zlib and
ISA-L release the GIL while they work, so a chunk server can run `encode` / `encode_parts` in a
worker thread.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from protocol import shuffle_zstd
from protocol.errors import NetworkProtocol
from protocol.messages import COMPRESSIONS, GZIP, NONE, SHUFFLE_ZSTD, WIRE_COMPRESSIONS
from protocol.messages import parse_wire_compression as parse_compression

try:
    from isal import isal_zlib as _deflate

    BACKEND = "isal"
    GZIP_LEVEL = 2
except ImportError:  # pragma: no cover - python-isal is a declared dependency
    _deflate = zlib  # type: ignore[assignment]
    BACKEND = "zlib"
    GZIP_LEVEL = 6

_GZIP_WBITS = 31  # deflate + gzip header and trailer (CRC-32, ISIZE)
_ERRORS: tuple[type[Exception], ...] = (zlib.error, _deflate.error)
# gzip for a peer that knows nothing else, by the link's payload bytes per second: a slow link
# gets zlib level 6 (the plugin's own, 3-5 % fewer bytes than ISA-L level 2, at ~22 MB/s a core:
# far more than such a link carries), a fast one ISA-L level 2 (13-18x faster).
GZIP_SPEED_LEVELS = ((8e6, GZIP_LEVEL), (0.0, 6))


def gzip_level_for_speed(wire_bytes_per_second: float | None) -> int:
    if wire_bytes_per_second is None:
        return GZIP_LEVEL
    return next(level for floor, level in GZIP_SPEED_LEVELS if wire_bytes_per_second >= floor)


def level_for_speed(compression: str, wire_bytes_per_second: float | None) -> int | None:
    """The level of `compression` for a link this fast (None: "none" has no level)."""
    if compression == SHUFFLE_ZSTD:
        return shuffle_zstd.level_for_speed(wire_bytes_per_second)
    return gzip_level_for_speed(wire_bytes_per_second) if compression == GZIP else None


def _deflater(level: int | None):
    """(module, level) for a gzip level: ISA-L for its fast levels 0-3, zlib above (4-9)."""
    if level is None:
        return _deflate, GZIP_LEVEL
    level = max(0, min(9, int(level)))
    return (zlib, level) if level > 3 else (_deflate, level)

BytesLike = bytes | bytearray | memoryview

CONTENT_TYPES = {GZIP: "application/gzip", NONE: "application/octet-stream",
                 SHUFFLE_ZSTD: "application/x-accelerator-shuffle-zstd"}


def available() -> tuple[str, ...]:
    """The encodings this process can encode and decode, best first (what it may advertise)."""
    return ((SHUFFLE_ZSTD,) if shuffle_zstd.AVAILABLE else ()) + (GZIP, NONE)


def negotiate(asked: str, strict: bool, offered: Iterable[str]) -> str:
    """The encoding to use with a peer: "gzip" becomes shuffle-zstd when we can use it and the
    peer advertised it (`offered`; empty for the real plugin), unless the user said strict."""
    offered = tuple(offered)
    if asked == GZIP and not strict and SHUFFLE_ZSTD in offered and SHUFFLE_ZSTD in available():
        return SHUFFLE_ZSTD
    return asked


def content_type(compression: str) -> str:
    """Content-Type of a chunk answer; never combined with a Content-Encoding (spec 2.5)."""
    return CONTENT_TYPES[parse_compression(compression)]


def encode(data: BytesLike, compression: str, level: int | None = None) -> bytes:
    """The wire payload of a raw bucket: the bytes themselves, or one gzip member of them."""
    compression = parse_compression(compression)
    if compression == NONE:
        return data if isinstance(data, bytes) else bytes(data)
    if compression == SHUFFLE_ZSTD:
        return shuffle_zstd.encode(data, level)
    module, level = _deflater(level)
    return module.compress(data, level, _GZIP_WBITS)


def encode_parts(parts: Iterable[BytesLike], compression: str, level: int | None = None) -> bytes:
    """Like `encode(b"".join(parts))` without building the joined raw bucket first."""
    compression = parse_compression(compression)
    if compression == NONE:
        return b"".join(parts)
    if compression == SHUFFLE_ZSTD:
        encoder = shuffle_zstd.Encoder(level)
        return b"".join([*(encoder.encode(part) for part in parts), encoder.finish()])
    module, level = _deflater(level)
    compressor = module.compressobj(level, module.DEFLATED, _GZIP_WBITS)
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)


class StreamEncoder:
    """Incremental encoder for payloads too large to hold: `encode` pieces, then `finish`."""

    def __init__(self, compression: str, level: int | None = None):
        compression = parse_compression(compression)
        self.gzip = compression == GZIP
        module, deflate_level = _deflater(level)
        self._compressor = module.compressobj(deflate_level, module.DEFLATED, _GZIP_WBITS) if self.gzip else None
        self._szstd = shuffle_zstd.Encoder(level) if compression == SHUFFLE_ZSTD else None

    def encode(self, piece: BytesLike) -> bytes:
        if self._szstd is not None:
            return self._szstd.encode(piece)
        if self._compressor is None:
            return piece if isinstance(piece, bytes) else bytes(piece)
        return self._compressor.compress(piece)

    def finish(self) -> bytes:
        if self._szstd is not None:
            return self._szstd.finish()
        return self._compressor.flush() if self._compressor is not None else b""


def stream_encoder(compression: str, level: int | None = None) -> StreamEncoder:
    return StreamEncoder(compression, level)


def decode(payload: BytesLike, compression: str, expected_size: int) -> bytes:
    """The raw bucket from a wire payload, which must decode to exactly `expected_size` bytes."""
    decoder = stream_decoder(compression, expected_size)
    data = decoder.feed(payload)
    decoder.finish()
    return data


class PlainStreamDecoder:
    """Incremental "none" decoder: passes bytes through and checks the total length."""

    def __init__(self, expected_size: int):
        if expected_size < 0:
            raise ValueError("expected_size must be >= 0")
        self.expected_size = expected_size
        self.produced = 0

    def feed(self, piece: BytesLike) -> bytes:
        data = piece if isinstance(piece, bytes) else bytes(piece)
        self.produced += len(data)
        if self.produced > self.expected_size:
            raise NetworkProtocol(f"Bucket payload longer than the expected {self.expected_size} bytes")
        return data

    def finish(self) -> None:
        if self.produced != self.expected_size:
            raise NetworkProtocol(f"Bucket payload size {self.produced} != {self.expected_size}")


class GzipStreamDecoder:
    """Incremental decoder of one gzip member with bounded output.

    `feed` returns the bytes inflated so far from each compressed piece (never more than
    `expected_size` in total), `finish` checks that the member ended (CRC-32 and ISIZE verified by
    the inflater) and that nothing followed it. Lets a receiver stream a request body to disk.
    """

    def __init__(self, expected_size: int):
        if expected_size < 0:
            raise ValueError("expected_size must be >= 0")
        self.expected_size = expected_size
        self.produced = 0
        self._inflater = _deflate.decompressobj(_GZIP_WBITS)

    def feed(self, piece: BytesLike) -> bytes:
        inflater = self._inflater
        if inflater.eof:
            if len(piece):
                raise NetworkProtocol("Data after the end of the gzip member")
            return b""
        out: list[bytes] = []
        pending = piece
        while True:
            try:
                # One byte more than allowed is enough to tell "too long" from "exact".
                data = inflater.decompress(pending, self.expected_size + 1 - self.produced)
            except _ERRORS as error:
                raise NetworkProtocol(f"Corrupted gzip payload: {error}") from error
            self.produced += len(data)
            if self.produced > self.expected_size:
                raise NetworkProtocol(f"Gzip payload inflates beyond the expected {self.expected_size} bytes")
            out.append(data)
            if inflater.eof:
                if inflater.unused_data:
                    raise NetworkProtocol("Data after the end of the gzip member (several members or garbage)")
                return b"".join(out)
            consumed = len(pending) - len(inflater.unconsumed_tail)
            pending = inflater.unconsumed_tail
            if not data and not pending:
                return b"".join(out)  # everything consumed: wait for the next piece
            if not data and not consumed:
                raise NetworkProtocol("Gzip decoder made no progress")

    def finish(self) -> None:
        if not self._inflater.eof:
            raise NetworkProtocol("Truncated gzip payload")
        if self.produced != self.expected_size:
            raise NetworkProtocol(f"Decompressed bucket size {self.produced} != {self.expected_size}")


def stream_decoder(compression: str, expected_size: int
                   ) -> PlainStreamDecoder | GzipStreamDecoder | shuffle_zstd.StreamDecoder:
    """An incremental decoder for a payload that must decode to `expected_size` bytes."""
    compression = parse_compression(compression)
    if compression == NONE:
        return PlainStreamDecoder(expected_size)
    if compression == SHUFFLE_ZSTD:
        return shuffle_zstd.StreamDecoder(expected_size)
    return GzipStreamDecoder(expected_size)


__all__ = [
    "BACKEND",
    "COMPRESSIONS",
    "CONTENT_TYPES",
    "GZIP_LEVEL",
    "gzip_level_for_speed",
    "level_for_speed",
    "GzipStreamDecoder",
    "PlainStreamDecoder",
    "SHUFFLE_ZSTD",
    "StreamEncoder",
    "WIRE_COMPRESSIONS",
    "available",
    "content_type",
    "decode",
    "encode",
    "encode_parts",
    "negotiate",
    "stream_decoder",
    "stream_encoder",
]
