"""protocol.codecs: one gzip member out, strict and bounded decoding in."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import parse_chunk_uri, resolve_ranges
from protocol.codecs import (
    GzipStreamDecoder,
    PlainStreamDecoder,
    content_type,
    decode,
    encode,
    encode_parts,
    stream_decoder,
)
from protocol.errors import NetworkProtocol, ParameterOutOfRange
from protocol.messages import PushTransaction

SAMPLE = b"DICM" + bytes(range(256)) * 40 + b"\0" * 20000 + b"end"


def gzip_members(payload: bytes) -> int:
    """How many gzip members a payload holds, read with the stdlib."""
    count, rest = 0, payload
    while rest:
        inflater = zlib.decompressobj(31)
        inflater.decompress(rest)
        assert inflater.eof
        count += 1
        rest = inflater.unused_data
    return count


# --------------------------------------------------------------------------- round trips and interop


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=20000), compression=st.sampled_from(["gzip", "none"]))
def test_round_trip(data, compression):
    assert decode(encode(data, compression), compression, len(data)) == data


def test_none_is_the_identity():
    assert encode(SAMPLE, "none") == SAMPLE
    assert encode(bytearray(b"abc"), "none") == b"abc"
    assert decode(b"abc", "none", 3) == b"abc"


def test_gzip_output_is_one_standard_member():
    payload = encode(SAMPLE, "gzip")
    assert payload[:3] == b"\x1f\x8b\x08"
    assert gzip_members(payload) == 1
    assert gzip.decompress(payload) == SAMPLE
    assert struct.unpack("<I", payload[-4:])[0] == len(SAMPLE)  # ISIZE, read by the plugin
    assert len(payload) < len(SAMPLE) // 2


def test_encode_parts_equals_encode_of_the_concatenation():
    parts = [SAMPLE[:100], memoryview(SAMPLE)[100:5000], bytearray(SAMPLE[5000:])]
    for compression in ("gzip", "none"):
        payload = encode_parts(parts, compression)
        assert decode(payload, compression, len(SAMPLE)) == SAMPLE
    assert gzip_members(encode_parts(parts, "gzip")) == 1
    assert decode(encode_parts([], "gzip"), "gzip", 0) == b""


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_decodes_python_gzip_at_every_level(level):
    assert decode(gzip.compress(SAMPLE, level), "gzip", len(SAMPLE)) == SAMPLE


def test_decodes_gzip_headers_with_name_comment_and_mtime():
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="bucket.bin", mode="wb", fileobj=buffer, mtime=1234567890) as f:
        f.write(SAMPLE)
    assert buffer.getvalue()[3] & 0x08  # FNAME set
    assert decode(buffer.getvalue(), "gzip", len(SAMPLE)) == SAMPLE
    extra = bytearray(gzip.compress(SAMPLE, mtime=0))
    extra[3] |= 0x04  # FEXTRA with a 4-byte extra field
    extra[10:10] = struct.pack("<H", 4) + b"AB\x00\x00"
    assert decode(bytes(extra), "gzip", len(SAMPLE)) == SAMPLE


def test_empty_bucket():
    assert decode(encode(b"", "gzip"), "gzip", 0) == b""
    assert gzip.decompress(encode(b"", "gzip")) == b""


# --------------------------------------------------------------------------- refusals


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


GOOD = gzip.compress(SAMPLE, 6, mtime=0)


@pytest.mark.parametrize("payload", [
    pytest.param(GOOD + GOOD, id="two members"),
    pytest.param(GOOD + b"\0", id="one trailing NUL"),
    pytest.param(GOOD + b"garbage", id="trailing garbage"),
    pytest.param(GOOD[:-1], id="ISIZE cut"),
    pytest.param(GOOD[:-8], id="trailer missing"),
    pytest.param(GOOD[: len(GOOD) // 2], id="truncated body"),
    pytest.param(GOOD[:5], id="truncated header"),
    pytest.param(b"", id="empty"),
    pytest.param(_flip(GOOD, len(GOOD) - 8), id="bad CRC"),
    pytest.param(GOOD[:-4] + struct.pack("<I", len(SAMPLE) + 1), id="bad ISIZE"),
    pytest.param(_flip(GOOD, 12), id="corrupt deflate data"),
    pytest.param(zlib.compress(SAMPLE), id="zlib wrapper"),
    pytest.param(zlib.compress(SAMPLE)[2:-4], id="raw deflate"),
    pytest.param(SAMPLE, id="not compressed at all"),
])
def test_malformed_gzip_is_a_network_protocol_error(payload):
    with pytest.raises(NetworkProtocol):
        decode(payload, "gzip", len(SAMPLE))


@pytest.mark.parametrize("expected", [0, len(SAMPLE) - 1, len(SAMPLE) + 1])
def test_wrong_decompressed_size_is_refused(expected):
    with pytest.raises(NetworkProtocol):
        decode(GOOD, "gzip", expected)
    with pytest.raises(NetworkProtocol):
        decode(SAMPLE, "none", expected)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_every_truncation_is_refused(cut):
    with pytest.raises(NetworkProtocol):
        decode(GOOD[:cut], "gzip", len(SAMPLE))


def test_unknown_compression():
    for call in (lambda: encode(b"", "zip"), lambda: decode(b"", "GZIP", 0), lambda: stream_decoder("x", 0),
                 lambda: content_type("None")):
        with pytest.raises(ParameterOutOfRange):
            call()


def _bomb(total: int) -> bytes:
    """`total` zero bytes in one gzip member, about 1000x smaller."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(total >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _bomb(256 << 20)


@pytest.mark.parametrize("expected", [1000, 4 << 20])
def test_gzip_bomb_is_refused_without_inflating_it(bomb, expected):
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(NetworkProtocol, match="beyond"):
            decode(bomb, "gzip", expected)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * expected + (2 << 20)  # bounded by the expected size, not by the bomb


def test_streaming_a_bomb_stops_at_the_bound(bomb):
    decoder = GzipStreamDecoder(1 << 20)
    with pytest.raises(NetworkProtocol):
        for start in range(0, len(bomb), 4096):
            decoder.feed(bomb[start : start + 4096])
    assert decoder.produced == (1 << 20) + 1  # never a byte more than expected + 1


# --------------------------------------------------------------------------- incremental decoding


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=30000) | st.just(SAMPLE),
    cuts=st.lists(st.integers(0, 40000), max_size=20),
    compression=st.sampled_from(["gzip", "none"]),
)
def test_stream_decoder_accepts_any_split_of_the_payload(data, cuts, compression):
    payload = encode(data, compression)
    bounds = sorted({0, len(payload), *(c for c in cuts if c < len(payload))})
    decoder = stream_decoder(compression, len(data))
    out = b"".join(decoder.feed(memoryview(payload)[a:b]) for a, b in zip(bounds, bounds[1:]))
    decoder.finish()
    assert out == data


def test_stream_decoder_one_byte_at_a_time():
    decoder = GzipStreamDecoder(len(SAMPLE))
    out = b"".join(decoder.feed(GOOD[i : i + 1]) for i in range(len(GOOD)))
    decoder.finish()
    assert out == SAMPLE


def test_stream_decoder_refuses_data_after_the_member_in_a_later_piece():
    decoder = GzipStreamDecoder(len(SAMPLE))
    assert decoder.feed(GOOD) == SAMPLE
    assert decoder.feed(b"") == b""
    with pytest.raises(NetworkProtocol):
        decoder.feed(GOOD[:10])


def test_stream_decoder_finish_detects_truncation_and_short_output():
    decoder = GzipStreamDecoder(len(SAMPLE))
    decoder.feed(GOOD[:-4])
    with pytest.raises(NetworkProtocol, match="Truncated"):
        decoder.finish()
    plain = PlainStreamDecoder(10)
    plain.feed(b"12345")
    with pytest.raises(NetworkProtocol):
        plain.finish()
    with pytest.raises(NetworkProtocol):
        plain.feed(b"123456")


def test_content_types():
    assert content_type("gzip") == "application/gzip"
    assert content_type("none") == "application/octet-stream"


# --------------------------------------------------------------------------- the captured payloads


def _dataset_bytes(wire, dataset: Path, ranges) -> bytes:
    out = bytearray()
    for instance_id, start, length in ranges:
        with open(dataset / wire.files[instance_id]["file"], "rb") as f:
            f.seek(start)
            out += f.read(length)
    return bytes(out)


def _pull_payloads(wire):
    for folder in ("03a-pull-64k-gzip", "03b-pull-64k-none", "03c-pull-4m-small-none", "03d-pull-4m-large-gzip",
                   "05-bidirectional-64k-gzip"):
        for exchange in wire.exchanges(folder):
            if exchange["method"] == "GET" and "/transfers/chunks/" in exchange["path"]:
                yield folder, exchange


def test_captured_chunk_answers_decode_to_the_dataset_bytes(wire, dataset):
    count = 0
    for folder, exchange in _pull_payloads(wire):
        request = parse_chunk_uri(exchange["target"])
        sizes = ((i, wire.files[i]["size"]) for i in request.instance_ids)
        ranges = resolve_ranges(sizes, request.offset, request.size)
        meta = exchange["response"]["body"]
        data = decode(wire.body(folder, exchange, "response"), request.compression, request.size)
        assert data == _dataset_bytes(wire, dataset, [(r.instance_id, r.start, r.length) for r in ranges])
        if request.compression == "gzip":
            assert meta["kind"] == "gzip" and len(data) == meta["gunzipped"]["size"]
            assert decode(encode(data, "gzip"), "gzip", len(data)) == data  # and our encoding of it reads back
        count += 1
    assert count == 9 + 9 + 1 + 5 + 9


def test_captured_push_bodies_decode_to_the_dataset_bytes(wire, dataset):
    count = 0
    for folder in ("04a-push-64k-gzip", "04b-push-64k-none", "04c-push-4m-small-gzip", "04d-push-4m-large-gzip"):
        exchanges = wire.exchanges(folder)
        transaction = PushTransaction.from_json(exchanges[1]["request"]["body"]["json"])
        for exchange in exchanges:
            if exchange["method"] != "PUT":
                continue
            bucket = transaction.buckets[int(exchange["path"].rsplit("/", 1)[1])]
            expected_size = sum(c.size for c in bucket)
            data = decode(wire.body(folder, exchange, "request"), transaction.compression, expected_size)
            assert data == _dataset_bytes(wire, dataset, [(c.instance_id, c.offset, c.size) for c in bucket])
            count += 1
    assert count == 9 + 9 + 1 + 4


def test_captured_bad_push_bodies_are_refused(wire):
    """Folder 06: #21/#22 one byte short/long (plugin: 500 NetworkProtocol), #49 raw bytes PUT into a
    gzip transaction (plugin: 500), #50 the same bytes gzip'ed by Python (accepted)."""
    by_seq = {e["seq"]: e for e in wire.exchanges("06-errors-and-edge-cases")}
    folder = "06-errors-and-edge-cases"
    for seq in (21, 22):
        assert by_seq[seq]["status"] == 500
        with pytest.raises(NetworkProtocol):
            decode(wire.body(folder, by_seq[seq], "request"), "none", 10926)
    with pytest.raises(NetworkProtocol):
        decode(wire.body(folder, by_seq[49], "request"), "gzip", 9926)
    assert decode(wire.body(folder, by_seq[50], "request"), "gzip", 9926) == wire.body(folder, by_seq[49], "request")


def test_same_bucket_same_gzip_bytes_in_pull_and_push(wire):
    """README 7: the plugin's gzip body of a pull chunk equals that of the matching push PUT."""
    pulls = {e["response"]["body"]["md5"] for e in wire.exchanges("03a-pull-64k-gzip") if e["method"] == "GET"}
    pushes = {e["request"]["body"]["md5"] for e in wire.exchanges("04a-push-64k-gzip") if e["method"] == "PUT"}
    assert len(pushes) == 9 and pushes <= pulls


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_stream_encoder_matches_one_shot_payload(compression):
    from protocol.codecs import stream_encoder

    data = bytes(range(256)) * 5000
    encoder = stream_encoder(compression)
    payload = b"".join(encoder.encode(data[i : i + 70000]) for i in range(0, len(data), 70000))
    payload += encoder.finish()
    assert decode(payload, compression, len(data)) == data
    if compression == "gzip":
        assert gzip.decompress(payload) == data and len(payload) < len(data)
