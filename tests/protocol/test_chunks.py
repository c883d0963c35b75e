"""protocol.chunks: chunk URIs, the chunk server's argument rules and range resolution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import (
    ChunkRequest,
    ReadRange,
    ScatterRange,
    chunk_uri,
    parse_chunk_request,
    parse_chunk_uri,
    resolve_ranges,
    scatter_ranges,
)
from protocol.errors import BadParameterType, ParameterOutOfRange, UnknownResource
from protocol.messages import Chunk, bucket_size
from protocol.planner import plan_pull_buckets

# --------------------------------------------------------------------------- building URIs


def test_spec_examples():
    bucket = (Chunk("d1", 0, 10), Chunk("d2", 0, 20), Chunk("d3", 0, 30))
    assert chunk_uri(bucket, "none") == "/transfers/chunks/d1.d2.d3?offset=0&size=60&compression=none"
    bucket = (Chunk("d1", 5, 5), Chunk("d2", 0, 20), Chunk("d3", 0, 7))
    assert chunk_uri(bucket, "gzip") == "/transfers/chunks/d1.d2.d3?offset=5&size=32&compression=gzip"


def test_empty_bucket_has_no_uri():
    with pytest.raises(ValueError):
        chunk_uri((), "none")


# --------------------------------------------------------------------------- parsing GET arguments


def test_defaults_when_no_argument():
    assert parse_chunk_request("a.b", {}) == ChunkRequest(("a", "b"), 0, 0, "none")


def test_arguments_in_any_order_unknown_ignored_last_wins():
    request = parse_chunk_request("a", [("compression", "gzip"), ("foo", "bar"), ("size", "7"),
                                        ("offset", "3"), ("offset", "4")])
    assert request == ChunkRequest(("a",), 4, 7, "gzip")


@pytest.mark.parametrize("value, number", [("0", 0), ("007", 7), ("+5", 5), ("-0", 0), ("2147483647", 2**31 - 1)])
def test_offsets_read_like_a_signed_32_bit_integer(value, number):
    assert parse_chunk_request("a", {"offset": value, "size": value}) == ChunkRequest(("a",), number, number, "none")


@pytest.mark.parametrize("value", ["-1", "abc", "", " 1", "1.0", "0x10", "2147483648", "99999999999", "\u0661", "1" * 5000])
@pytest.mark.parametrize("key", ["offset", "size"])
def test_bad_offsets_and_sizes_are_bad_parameter_type(key, value):
    with pytest.raises(BadParameterType):
        parse_chunk_request("a", {key: value})


@pytest.mark.parametrize("value", ["NONE", "Gzip", "bogus", "", "deflate"])
def test_compression_is_case_sensitive(value):
    with pytest.raises(ParameterOutOfRange):
        parse_chunk_request("a", {"compression": value})


@pytest.mark.parametrize("ids", ["not-an-id", "ABC", "a/b", "", "a b", "a%2e"])
def test_ids_outside_the_route_charset_are_unknown(ids):
    with pytest.raises(UnknownResource):
        parse_chunk_request(ids, {})


def test_parse_uri_accepts_the_plugins_double_slash():
    uri = "//transfers/chunks/d1.d2?offset=5&size=32&compression=gzip"
    assert parse_chunk_uri(uri) == ChunkRequest(("d1", "d2"), 5, 32, "gzip")
    with pytest.raises(UnknownResource):
        parse_chunk_uri("/transfers/push/d1")


# --------------------------------------------------------------------------- resolving ranges

SIZES = [("a", 10), ("b", 20), ("c", 5)]


@pytest.mark.parametrize("offset, size, expected", [
    (0, 0, [("a", 0, 10), ("b", 0, 20), ("c", 0, 5)]),     # size 0: everything
    (0, 35, [("a", 0, 10), ("b", 0, 20), ("c", 0, 5)]),
    (3, 10, [("a", 3, 7), ("b", 0, 3)]),                    # spans two instances
    (10, 5, [("b", 0, 5)]),                                 # offset == size of a: skipped
    (12, 0, [("b", 2, 18), ("c", 0, 5)]),                   # offset beyond a continues in b
    (33, 100, [("c", 3, 2)]),                               # shorter than asked at the end
    (35, 10, []),                                           # offset == total: nothing
    (1000, 0, []),                                          # offset past everything
])
def test_general_skip_semantics(offset, size, expected):
    assert resolve_ranges(SIZES, offset, size) == [ReadRange(*r) for r in expected]


def test_sizes_are_only_asked_for_instances_the_range_reaches():
    asked = []

    def lookup():
        for instance_id, size in [("a", 10), ("unknown", None)]:
            asked.append(instance_id)
            if size is None:
                raise UnknownResource(instance_id)
            yield instance_id, size

    assert resolve_ranges(lookup(), 0, 10) == [ReadRange("a", 0, 10)]
    assert asked == ["a"]
    with pytest.raises(UnknownResource):
        resolve_ranges(lookup(), 0, 11)
    with pytest.raises(UnknownResource):
        resolve_ranges(lookup(), 0, 0)


def test_scatter_ranges_follow_payload_order_and_skip_empty_chunks():
    bucket = (Chunk("a", 5, 5), Chunk("x", 0, 0), Chunk("b", 0, 20), Chunk("c", 0, 7))
    assert scatter_ranges(bucket) == [
        ScatterRange("a", 5, 5, 0),
        ScatterRange("b", 0, 20, 5),
        ScatterRange("c", 0, 7, 25),
    ]


# --------------------------------------------------------------------------- the captured chunk GETs


def _chunk_gets(wire, folder):
    return [e for e in wire.exchanges(folder) if e["method"] == "GET" and "/transfers/chunks/" in e["path"]]


def _store(wire):
    """`(id, size)` pairs as a chunk server would look them up: unknown IDs are a 404."""
    def lookup(ids):
        for instance_id in ids:
            if instance_id not in wire.files:
                raise UnknownResource(instance_id)
            yield instance_id, wire.files[instance_id]["size"]
    return lookup


@pytest.mark.parametrize("folder", ["03a-pull-64k-gzip", "03b-pull-64k-none", "03c-pull-4m-small-none",
                                    "03d-pull-4m-large-gzip", "05-bidirectional-64k-gzip",
                                    "06-errors-and-edge-cases"])
def test_captured_chunk_requests_resolve_to_the_ranges_the_plugin_served(wire, folder, check_ranges):
    lookup = _store(wire)
    gets = _chunk_gets(wire, folder)
    assert gets
    for exchange in gets:
        status = exchange["status"]
        ids_text = exchange["path"].split("/transfers/chunks/", 1)[1]
        query = [tuple(pair) for pair in exchange["query"]]
        if status == 400:
            expected = {3: ParameterOutOfRange, 5: BadParameterType}[exchange["response"]["body"]["json"]["OrthancStatus"]]
            with pytest.raises(expected):
                parse_chunk_request(ids_text, query)
            continue
        if status == 404:
            with pytest.raises(UnknownResource):
                request = parse_chunk_request(ids_text, query)
                resolve_ranges(lookup(request.instance_ids), request.offset, request.size)
            continue
        assert status == 200, exchange["label"]
        request = parse_chunk_request(ids_text, query)
        ranges = resolve_ranges(lookup(request.instance_ids), request.offset, request.size)
        body = exchange["response"]["body"]
        assert sum(r.length for r in ranges) == body.get("gunzipped", body)["size"]
        if "dataset_check" in body:
            assert body["dataset_check"].startswith("OK")
            served = [(wire.basename(r.instance_id), r.start, r.length) for r in ranges]
            assert served == check_ranges(body["dataset_check"])
        content_type = dict((k.lower(), v) for k, v in exchange["response"]["headers"])["content-type"]
        assert content_type == {"gzip": "application/gzip", "none": "application/octet-stream"}[request.compression]


# --------------------------------------------------------------------------- round trips


ids = st.text("0123456789abcdef-", min_size=1, max_size=44)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.dictionaries(ids, st.integers(0, 3000), max_size=30),
    threshold=st.integers(1, 1500),
    compression=st.sampled_from(["gzip", "none"]),
)
def test_planned_buckets_round_trip_through_their_uri(sizes, threshold, compression):
    """(ids, first offset, total size) + instance sizes determine every chunk (spec 6.1)."""
    for bucket in plan_pull_buckets(sizes, threshold, "http://localhost:8042/", compression):
        request = parse_chunk_uri(chunk_uri(bucket, compression))
        assert request == ChunkRequest(tuple(c.instance_id for c in bucket), bucket[0].offset,
                                       bucket_size(bucket), compression)
        ranges = resolve_ranges(((i, sizes[i]) for i in request.instance_ids), request.offset, request.size)
        assert [(r.instance_id, r.start, r.length) for r in ranges] == [(c.instance_id, c.offset, c.size) for c in bucket]
        scatter = scatter_ranges(bucket)
        assert [(s.instance_id, s.instance_offset, s.length) for s in scatter] == \
            [(r.instance_id, r.start, r.length) for r in ranges]
        assert scatter[-1].payload_offset + scatter[-1].length == bucket_size(bucket)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    offset=st.integers(0, 500),
    size=st.integers(0, 500),
)
def test_resolve_matches_slicing_the_concatenation(sizes, offset, size):
    """The skip semantics are "slice the concatenated instances", starting inside the instance
    that holds `offset` (empty instances in between contribute nothing)."""
    names = [f"i{n}" for n in range(len(sizes))]
    blob = [(name, position) for name, s in zip(names, sizes) for position in range(s)]
    end = len(blob) if size == 0 else offset + size
    expected = blob[offset:end]
    ranges = resolve_ranges(zip(names, sizes), offset, size)
    got = [(r.instance_id, r.start + k) for r in ranges for k in range(r.length)]
    assert got == expected
    assert all(r.length > 0 for r in ranges)
