"""protocol.shuffle_zstd and its place in codecs/chunks/messages: exact, bounded, content-aware."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codecs, shuffle_zstd
from protocol.chunks import chunk_uri, parse_chunk_uri
from protocol.errors import BadFileFormat, BadParameterType, NetworkProtocol, ParameterOutOfRange
from protocol.messages import Chunk, PushTransaction, TransferQuery, parse_compression, parse_wire_compression
from protocol.shuffle_zstd import BLOCK, DELTA, MAGIC, STORED, StreamDecoder, choose_mode, decode, encode

SZSTD = "shuffle-zstd"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
HEADER = struct.Struct("<BIII")


def smooth16(pixels: int, seed: int = 1) -> bytes:
    """An image-like ramp of 16-bit words with a little noise: what DELTA is for."""
    noise = hashlib.shake_256(str(seed).encode()).digest(pixels)
    return b"".join(struct.pack("<H", (1000 + (i % 512) * 3 + noise[i] % 7) & 0xFFFF) for i in range(pixels))


def incompressible(size: int, seed: int = 2) -> bytes:
    return hashlib.shake_256(str(seed).encode()).digest(size)


# --------------------------------------------------------------------------- exact round trips


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=40000), level=st.sampled_from([None, 1, 3, 19]))
def test_round_trip_of_any_bytes(data, level):
    assert decode(encode(data, level), len(data)) == data


@pytest.mark.parametrize("size", [0, 1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3])
def test_round_trip_across_block_boundaries(size):
    data = (smooth16(size // 2 + 1) + b"x")[:size]
    payload = encode(data)
    assert payload.startswith(MAGIC)
    assert decode(payload, size) == data


def test_every_mode_round_trips_odd_lengths_and_wrapping_words():
    data = struct.pack("<6H", 0, 0xFFFF, 1, 0x8000, 0x7FFF, 0) + b"\x01"  # differences wrap around
    for mode in shuffle_zstd.MODES:
        payload = MAGIC + shuffle_zstd.encode_block(data, 1, mode)
        assert decode(payload, len(data)) == data


def test_real_dicom_files_round_trip_through_the_codec_api():
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        path = TEST_FILES / name
        if path.is_file():
            data = path.read_bytes()
            assert codecs.decode(codecs.encode(data, SZSTD), SZSTD, len(data)) == data


def test_stream_encoder_and_encode_parts_give_the_same_payload_as_encode():
    data = smooth16(BLOCK // 2 + 5000) + incompressible(300000)
    whole = codecs.encode(data, SZSTD, 3)
    parts = [data[i:i + 77777] for i in range(0, len(data), 77777)]
    assert codecs.encode_parts(parts, SZSTD, 3) == whole
    encoder = codecs.stream_encoder(SZSTD, 3)
    assert b"".join([*(encoder.encode(p) for p in parts), encoder.finish()]) == whole


def test_streaming_decode_in_tiny_pieces():
    data = smooth16(70000) + incompressible(5000)
    payload = encode(data)
    decoder = codecs.stream_decoder(SZSTD, len(data))
    out = b"".join(decoder.feed(payload[i:i + 999]) for i in range(0, len(payload), 999))
    decoder.finish()
    assert out == data


# --------------------------------------------------------------------------- content-aware


def test_smooth_16_bit_pixels_use_delta_and_beat_gzip():
    data = smooth16(200000)
    assert choose_mode(data) == DELTA
    assert len(encode(data)) < 0.8 * len(zlib.compress(data, 6))


def test_incompressible_data_is_stored_as_it_is():
    data = incompressible(BLOCK + 1000)
    assert choose_mode(data) == STORED
    payload = encode(data)
    assert len(payload) == len(data) + len(MAGIC) + 2 * HEADER.size  # two stored blocks, nothing more
    assert decode(payload, len(data)) == data


def test_a_block_never_expands_even_when_the_sample_lies():
    data = bytes(SAMPLE_SIZE := shuffle_zstd.SAMPLE) * 0 + incompressible(10000)
    block = shuffle_zstd.encode_block(data, 1, shuffle_zstd.ZSTD)  # forced: zstd would expand it
    assert block[0] == STORED and len(block) == len(data) + HEADER.size
    assert SAMPLE_SIZE == 64 * 1024


def test_level_follows_the_link_speed():
    assert shuffle_zstd.level_for_speed(None) == shuffle_zstd.DEFAULT_LEVEL
    fast, slow = shuffle_zstd.level_for_speed(100e6), shuffle_zstd.level_for_speed(1e6)
    assert fast <= shuffle_zstd.level_for_speed(20e6) <= slow and fast < slow


# --------------------------------------------------------------------------- bounded, strict decoding


def _payload_with(mode: int, raw_len: int, body: bytes, crc: int = 0) -> bytes:
    return MAGIC + HEADER.pack(mode, raw_len, len(body), crc) + body


def test_a_zstd_bomb_is_refused_before_inflating():
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(BLOCK))  # 1 MiB of zeros in a few bytes
    with pytest.raises(NetworkProtocol, match="beyond the expected"):
        StreamDecoder(1000).feed(_payload_with(shuffle_zstd.ZSTD, BLOCK, bomb))
    # A frame that declares more than its block header: refused before decompression.
    with pytest.raises(NetworkProtocol, match="wrong size"):
        StreamDecoder(BLOCK).feed(_payload_with(shuffle_zstd.ZSTD, 1000, bomb))
    big = zstandard.ZstdCompressor(level=1).compress(bytes(64 * BLOCK))
    with pytest.raises(NetworkProtocol):
        StreamDecoder(64 * BLOCK).feed(_payload_with(shuffle_zstd.ZSTD, 64 * BLOCK, big))


def test_corruption_anywhere_is_detected():
    data = smooth16(100000) + incompressible(50000)
    payload = encode(data)
    for position in range(len(MAGIC), len(payload), max(1, len(payload) // 97)):
        bad = bytearray(payload)
        bad[position] ^= 0x5A
        with pytest.raises(NetworkProtocol):
            decode(bytes(bad), len(data))


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 17, -1])
def test_truncated_payloads_are_refused(cut):
    data = smooth16(1000)
    payload = encode(data)
    with pytest.raises(NetworkProtocol):
        decode(payload[:cut], len(data))


def test_garbage_after_the_payload_and_wrong_sizes_are_refused():
    data = smooth16(1000)
    payload = encode(data)
    for bad, size in ((payload + b"\0", len(data)), (payload, len(data) + 1), (payload, len(data) - 1),
                      (b"GZIP" + payload[4:], len(data)), (MAGIC + HEADER.pack(9, 4, 4, 0) + b"abcd", 4),
                      (MAGIC + HEADER.pack(STORED, 4, 5, 0) + b"abcde", 4), (MAGIC + HEADER.pack(STORED, 0, 0, 0), 0)):
        with pytest.raises(NetworkProtocol):
            decode(bad, size)


def test_an_empty_bucket_is_the_magic_alone():
    assert encode(b"") == MAGIC
    assert decode(MAGIC, 0) == b""


# --------------------------------------------------------------------------- the protocol around it


def test_the_codec_is_a_wire_compression_never_a_user_one():
    assert parse_wire_compression(SZSTD) == SZSTD
    with pytest.raises(ParameterOutOfRange):
        parse_compression(SZSTD)
    with pytest.raises(ParameterOutOfRange):
        TransferQuery.from_json({"Resources": [], "Peer": "p", "Compression": SZSTD})
    with pytest.raises(ParameterOutOfRange):
        parse_wire_compression("zstd")
    plan = {"Instances": [], "Buckets": [], "Compression": SZSTD}
    assert PushTransaction.from_json(plan).compression == SZSTD
    assert codecs.content_type(SZSTD) == "application/x-accelerator-shuffle-zstd"


def test_strict_compression_in_a_transfer_query():
    base = {"Resources": [], "Peer": "p", "Compression": "gzip"}
    assert TransferQuery.from_json(base).strict is False
    strict = TransferQuery.from_json(dict(base, StrictCompression=True))
    assert strict.strict and strict.to_json()["StrictCompression"] is True
    assert "StrictCompression" not in TransferQuery.from_json(base).to_json()
    with pytest.raises(BadFileFormat):
        TransferQuery.from_json(dict(base, StrictCompression="yes"))


def test_negotiation():
    assert codecs.negotiate("gzip", False, [SZSTD, "gzip", "none"]) == SZSTD
    assert codecs.negotiate("gzip", True, [SZSTD, "gzip"]) == "gzip"
    assert codecs.negotiate("gzip", False, ()) == "gzip"  # the plugin advertises nothing
    assert codecs.negotiate("gzip", False, ["gzip", "none"]) == "gzip"
    assert codecs.negotiate("none", False, [SZSTD]) == "none"
    assert codecs.available()[0] == SZSTD


def test_chunk_uri_carries_a_level_for_our_codec_only():
    bucket = (Chunk("d1", 0, 10),)
    assert chunk_uri(bucket, "gzip", 3) == "/transfers/chunks/d1?offset=0&size=10&compression=gzip"
    assert chunk_uri(bucket, "none", 3).endswith("compression=none")
    uri = chunk_uri(bucket, SZSTD, 3)
    assert uri.endswith(f"compression={SZSTD}&level=3")
    request = parse_chunk_uri(uri)
    assert (request.compression, request.level) == (SZSTD, 3)
    assert parse_chunk_uri("/transfers/chunks/d1?compression=gzip").level is None
    for bad in ("0", "20", "-1", "x", "١", "100000"):
        with pytest.raises(BadParameterType):
            parse_chunk_uri(f"/transfers/chunks/d1?compression={SZSTD}&level={bad}")


def test_gzip_level_follows_the_link_speed_and_stays_one_standard_member():
    assert codecs.gzip_level_for_speed(None) == codecs.GZIP_LEVEL
    assert codecs.gzip_level_for_speed(100e6) == codecs.GZIP_LEVEL  # fast link: ISA-L's fast level
    assert codecs.gzip_level_for_speed(2.5e6) == 6  # 20 Mbit/s: the plugin's own level, fewer bytes
    assert codecs.level_for_speed("none", 1e6) is None
    assert codecs.level_for_speed(SZSTD, 1e6) == shuffle_zstd.level_for_speed(1e6)
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    for level in (None, 0, 2, 6, 9):
        payload = codecs.encode(data, "gzip", level)
        assert zlib.decompress(payload, 31) == data
        assert zlib.decompress(codecs.encode_parts([data[:1000], data[1000:]], "gzip", level), 31) == data
        encoder = codecs.stream_encoder("gzip", level)
        assert zlib.decompress(encoder.encode(data) + encoder.finish(), 31) == data
    assert codecs.encode(data, "gzip", 6) == zlib.compress(data, 6, wbits=31)  # exactly gzip-6
