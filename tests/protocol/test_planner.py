"""protocol.planner: the bucket plan of spec section 5, checked against the plugin's own plans."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import chunk_uri
from protocol.messages import Chunk, InstanceInfo, bucket_size, bucket_to_json
from protocol.chunks import resolve_ranges
from protocol.planner import (
    MAX_PULL_URL_LENGTH,
    MIN_TAPERED_PIECE,
    bucket_count_bound,
    plan_buckets,
    plan_pull_buckets,
    plan_push_buckets,
    taper,
)

T = 4 * 1024 * 1024
LOCAL = "http://localhost:8042/"
PROXY_B = "http://127.0.0.1:18043/"  # the peer URL the captured plugin of A pulled through
PROXY_A = "http://127.0.0.1:18042/"


def ids_of(bucket):
    return [chunk.instance_id for chunk in bucket]


# --------------------------------------------------------------------------- spec section 5 examples


def test_small_instance_is_grouped():
    plan = plan_push_buckets({"a": 1000, "b": 1000, "c": 5_000_000}, T)
    assert plan == [(Chunk("c", 0, 5_000_000),), (Chunk("a", 0, 1000), Chunk("b", 0, 1000))]


def test_medium_instance_is_one_bucket():
    assert plan_push_buckets({"a": 5_000_000}, T) == [(Chunk("a", 0, 5_000_000),)]


def test_large_instance_is_split_with_the_remainder_in_the_last_piece():
    assert plan_push_buckets({"a": 20_000_000}, T) == [
        (Chunk("a", 0, 6_666_666),),
        (Chunk("a", 6_666_666, 6_666_666),),
        (Chunk("a", 13_333_332, 6_666_668),),
    ]


def test_thresholds_are_t_and_2t():
    assert plan_push_buckets({"a": T - 1, "b": 1}, T) == [(Chunk("a", 0, T - 1), Chunk("b", 0, 1))]
    assert plan_push_buckets({"a": T}, T) == [(Chunk("a", 0, T),)]
    assert plan_push_buckets({"a": 2 * T - 1}, T) == [(Chunk("a", 0, 2 * T - 1),)]
    assert plan_push_buckets({"a": 2 * T}, T) == [(Chunk("a", 0, 2 * T),)]  # k = 1: one piece of S
    assert plan_push_buckets({"a": 2 * T + 1}, T) == [(Chunk("a", 0, T),), (Chunk("a", T, T + 1),)]


@pytest.mark.parametrize("threshold, expected", [
    (10, [["d1"], ["d2"], ["d3"]]),
    (20, [["d1", "d2"], ["d3"]]),
    (21, [["d1", "d2", "d3"]]),
])
def test_three_ten_byte_instances(threshold, expected):
    sizes = {"d3": 10, "d1": 10, "d2": 10}
    for plan in (plan_push_buckets(sizes, threshold), plan_pull_buckets(sizes, threshold, LOCAL, "gzip")):
        assert [ids_of(b) for b in plan] == expected


def test_long_base_url_gives_one_pull_bucket_per_instance_but_not_in_push():
    sizes = {"d1": 10, "d2": 10, "d3": 10}
    base = "http://" + "x" * (2048 - len("http:///")) + "/"
    assert len(base) == 2048
    assert [ids_of(b) for b in plan_pull_buckets(sizes, 21, base, "none")] == [["d1"], ["d2"], ["d3"]]
    assert [ids_of(b) for b in plan_push_buckets(sizes, 21)] == [["d1", "d2", "d3"]]


def test_url_rule_closes_a_group_at_1956_characters():
    ids = [f"{i:08x}-00000000-00000000-00000000-00000000" for i in range(100)]
    plan = plan_pull_buckets({i: 10 for i in ids}, T, LOCAL, "none")
    first = plan[0]
    assert len(LOCAL + chunk_uri(first, "none")) >= MAX_PULL_URL_LENGTH
    assert len(LOCAL + chunk_uri(first[:-1], "none")) < MAX_PULL_URL_LENGTH
    assert len(first) == 42  # spec 5: about 42 IDs with a 22-character base URL
    assert sum(len(b) for b in plan) == 100


def test_medium_and_large_buckets_come_first_in_id_order_then_groups():
    plan = plan_push_buckets({"e": 10, "d": 2 * T + 5, "c": 20, "b": T, "a": 30}, T)
    assert [ids_of(b) for b in plan] == [["b"], ["d"], ["d"], ["a", "c", "e"]]


def test_ids_are_sorted_bytewise():
    plan = plan_push_buckets({"b": 1, "B": 1, "a": 1, "\u00e9": 1, "0": 1}, T)
    assert ids_of(plan[0]) == ["0", "B", "a", "b", "\u00e9"]


def test_inputs_may_be_a_mapping_pairs_or_instance_infos():
    md5 = "0" * 32
    expected = plan_push_buckets({"a": 10, "b": 20}, 15)
    assert plan_push_buckets([("b", 20), ("a", 10)], 15) == expected
    assert plan_push_buckets([InstanceInfo("b", 20, md5), InstanceInfo("a", 10, md5)], 15) == expected
    assert plan_buckets({"a": 10, "b": 20}, 15) == expected
    assert plan_buckets({"a": 10, "b": 20}, 15, base_url=LOCAL, compression="gzip") == expected


def test_zero_length_instances_are_dropped():
    assert plan_pull_buckets({"a": 0, "b": 5}, 10, LOCAL, "none") == [(Chunk("b", 0, 5),)]
    assert plan_push_buckets({"a": 0}, 10) == []


def test_bad_inputs():
    with pytest.raises(ValueError):
        plan_push_buckets({"a": 1}, 0)
    with pytest.raises(ValueError):
        plan_push_buckets([("a", 1), ("a", 2)], 10)
    with pytest.raises(ValueError):
        plan_push_buckets({"a": -1}, 10)
    with pytest.raises(ValueError):
        plan_pull_buckets({"a": 1}, 10, LOCAL, "zip")


# --------------------------------------------------------------------------- the plugin's captured plans


def _pull_targets(wire, folder):
    return [e["target"] for e in wire.exchanges(folder) if e["method"] == "GET" and "/transfers/chunks/" in e["target"]]


@pytest.mark.parametrize("folder, base_url", [
    ("03a-pull-64k-gzip", PROXY_B),
    ("03b-pull-64k-none", PROXY_B),
    ("03c-pull-4m-small-none", PROXY_B),
    ("03d-pull-4m-large-gzip", PROXY_B),
    ("05-bidirectional-64k-gzip", PROXY_A),
])
def test_pull_plan_reproduces_the_captured_chunk_uris(wire, folder, base_url):
    index = wire.index(folder)
    threshold = index["transfers_bucket_size_kib"] * 1024
    lookup = next(e for e in index["exchanges"] if e["path"].endswith("/transfers/lookup"))
    ids = [i["ID"] for i in lookup["response"]["body"]["json"]["Instances"]]
    compression = _pull_targets(wire, folder)[0].rsplit("=", 1)[1]
    plan = plan_pull_buckets(wire.sizes(ids), threshold, base_url, compression)
    # The peer URL ends with '/', the URI starts with '/': the plugin requests '//transfers/...'.
    ours = ["/" + chunk_uri(bucket, compression) for bucket in plan]
    # Four worker threads issue the requests, so only the set of requests is deterministic.
    assert sorted(ours) == sorted(_pull_targets(wire, folder))


@pytest.mark.parametrize("folder", ["04a-push-64k-gzip", "04b-push-64k-none", "04c-push-4m-small-gzip",
                                    "04d-push-4m-large-gzip", "09-push-failure-discard"])
def test_push_plan_reproduces_the_captured_creation_body_in_order(wire, folder):
    index = wire.index(folder)
    threshold = index["transfers_bucket_size_kib"] * 1024
    body = next(e for e in index["exchanges"] if e["target"] == "//transfers/push")["request"]["body"]["json"]
    ids = [i["ID"] for i in body["Instances"]]
    assert ids == sorted(ids)
    plan = plan_push_buckets(wire.sizes(ids), threshold)
    assert [bucket_to_json(b) for b in plan] == body["Buckets"]  # bucket i is PUT to {Path}/i


def test_readme_facts_small_set_64k(wire):
    plan = plan_push_buckets(wire.sizes(set_name="small"), 64 * 1024)
    assert len(plan) == 9
    sc = next(i for i, f in wire.files.items() if f["file"].endswith("split-sc-10frames.dcm"))
    assert [b[0].offset for b in plan if b[0].instance_id == sc] == [0, 109_804, 219_608]
    groups = [b for b in plan if len(b) > 1]
    assert len(groups) == 5 and {bucket_size(g) for g in groups} == {68_920, 98_136}
    assert plan_pull_buckets(wire.sizes(set_name="small"), 64 * 1024, PROXY_B, "gzip") == plan


def test_readme_facts_large_set_4m(wire):
    sizes = wire.sizes(set_name="large")
    pull = plan_pull_buckets(sizes, T, PROXY_B, "gzip")
    push = plan_push_buckets(sizes, T)
    assert [len(b) for b in pull] == [1, 1, 1, 42, 8]
    assert [len(b) for b in push] == [1, 1, 1, 50]
    assert [bucket_size(b) for b in push[:3]] == [6_991_089, 6_991_089, 6_991_090]
    small = wire.sizes(set_name="small")
    assert [len(b) for b in plan_pull_buckets(small, T, PROXY_B, "none")] == [22]
    assert plan_pull_buckets(small, T, PROXY_B, "none") == plan_push_buckets(small, T)


# --------------------------------------------------------------------------- properties


orthanc_ids = st.text("0123456789abcdef", min_size=40, max_size=40).map(
    lambda h: "-".join(h[i : i + 8] for i in range(0, 40, 8))
)


@st.composite
def plans(draw, pull: bool):
    threshold = draw(st.integers(1, 5000))
    # A mix of tiny instances (many per group, so that pull URLs grow long) and up to 5T ones.
    size = st.one_of(st.integers(0, 5 * threshold), st.integers(1, max(1, threshold // 60)))
    count = draw(st.integers(0, 120))
    sizes = draw(st.dictionaries(orthanc_ids, size, min_size=count, max_size=count))
    if pull:
        base = draw(st.sampled_from([LOCAL, PROXY_B, "https://h/" + "p/" * draw(st.integers(0, 400))]))
        compression = draw(st.sampled_from(["gzip", "none"]))
        return sizes, threshold, plan_pull_buckets(sizes, threshold, base, compression), (base, compression)
    return sizes, threshold, plan_push_buckets(sizes, threshold), None


def _check_plan(sizes, threshold, plan, pull):
    separate = 2 * threshold
    # Every byte of every instance, exactly once.
    covered = defaultdict(list)
    for bucket in plan:
        assert bucket, "no empty bucket"
        for chunk in bucket:
            assert chunk.size > 0
            covered[chunk.instance_id].append((chunk.offset, chunk.end))
    assert set(covered) == {i for i, s in sizes.items() if s > 0}
    for instance_id, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == sizes[instance_id]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # Shape and size bounds of section 5.
    is_single = [sizes[b[0].instance_id] >= threshold for b in plan]
    count = is_single.count(True)
    assert is_single == [True] * count + [False] * (len(plan) - count)  # medium/large first
    singles, groups = plan[:count], plan[count:]
    assert all(len(b) == 1 for b in singles)
    assert [ids_of(b)[0] for b in singles] == sorted(ids_of(b)[0] for b in singles)
    for bucket in singles:
        n = sizes[bucket[0].instance_id]
        if n < separate:
            assert bucket == (Chunk(bucket[0].instance_id, 0, n),)
        else:
            k = -(-n // separate)
            assert threshold <= bucket[0].size <= separate + k - 1  # spec says <= S; the remainder may add k-1
    grouped = [c.instance_id for g in groups for c in g]
    assert grouped == sorted(grouped)
    for index, group in enumerate(groups):
        assert all(c.offset == 0 and c.size == sizes[c.instance_id] < threshold for c in group)
        total = bucket_size(group)
        assert total < 2 * threshold
        prefix_total = total - group[-1].size
        assert prefix_total < threshold  # it would have closed earlier
        if pull:
            base, compression = pull
            if len(group) > 1:
                assert len(base + chunk_uri(group[:-1], compression)) < MAX_PULL_URL_LENGTH
            if index < len(groups) - 1:
                assert total >= threshold or len(base + chunk_uri(group, compression)) >= MAX_PULL_URL_LENGTH
        elif index < len(groups) - 1:
            assert total >= threshold


@settings(max_examples=100, deadline=None)
@given(plans(pull=False))
def test_push_plans_cover_every_byte_once_within_bounds(case):
    sizes, threshold, plan, _ = case
    _check_plan(sizes, threshold, plan, None)


@settings(max_examples=100, deadline=None)
@given(plans(pull=True))
def test_pull_plans_cover_every_byte_once_within_bounds(case):
    sizes, threshold, plan, pull = case
    _check_plan(sizes, threshold, plan, pull)
    assert len(plan) <= bucket_count_bound(sizes, threshold)


def test_bucket_count_bound_is_known_without_planning():
    """A peer declaring a 2**63-1 byte instance: the bound says how absurd before any plan."""
    huge = "ffffffff-ffffffff-ffffffff-ffffffff-ffffffff"
    assert bucket_count_bound({huge: 2**63 - 1}, T) == -(-(2**63 - 1) // (2 * T))
    assert bucket_count_bound({huge: 2**40}, T) == 131_072 == len(plan_pull_buckets({huge: 2**40}, T, LOCAL, "none"))
    small = {f"{i:08x}-00000000-00000000-00000000-00000000": 10 for i in range(50)}
    assert bucket_count_bound(small, T) == 50 > len(plan_push_buckets(small, T))
    with pytest.raises(ValueError):
        bucket_count_bound(small, 0)


def test_adaptive_bucket_size_only_shrinks_small_transfers():
    from protocol.planner import MIN_ADAPTIVE_BUCKET, adaptive_bucket_size

    T = 4 * 1024 * 1024
    assert adaptive_bucket_size(10 * 1024**3, T, 12) == T  # large transfer: the configured size
    assert adaptive_bucket_size(72 * 1024**2, T, 12) == 1024**2  # 72 MiB / (12 workers x 6)
    assert adaptive_bucket_size(1024, T, 12) == MIN_ADAPTIVE_BUCKET  # never tiny buckets
    assert adaptive_bucket_size(1024, 64 * 1024, 4) == 64 * 1024  # never above the configured size
    # every worker gets at least 4 buckets when the floor does not bind
    sizes = [(f"{i:08x}-00000000-00000000-00000000-00000000", 530_000) for i in range(100)]
    total = sum(size for _, size in sizes)
    buckets = plan_push_buckets(sizes, adaptive_bucket_size(total, T, 12))
    assert len(buckets) >= 12 * 4


# --------------------------------------------------------------------------- the tapered last round

def _pieces_are_contiguous_and_served_right(sizes, piece):
    """A piece reads, through the chunk server's rules, exactly its own chunks: only its first
    chunk may start inside an instance, only its last may stop inside one."""
    assert piece and all(c.size > 0 for c in piece)
    for c in piece[1:]:
        assert c.offset == 0
    for c in piece[:-1]:
        assert c.offset + c.size == sizes[c.instance_id]
    served = resolve_ranges([(c.instance_id, sizes[c.instance_id]) for c in piece], piece[0].offset,
                            bucket_size(piece))
    assert [(r.instance_id, r.start, r.length) for r in served] == [(c.instance_id, c.offset, c.size) for c in piece]


@settings(max_examples=100, deadline=None)
@given(plans(pull=True), st.integers(0, 20), st.integers(1, 6))
def test_a_tapered_plan_keeps_its_head_and_covers_every_byte_once(case, workers, pieces):
    sizes, threshold, plan, pull = case
    tapered = taper(plan, workers, pieces, min_piece=1)
    tail = min(workers, len(plan) // 2)
    assert tapered[: len(plan) - tail] == plan[: len(plan) - tail]
    cut = tapered[len(plan) - tail:]
    # Pieces only split chunks: the same bytes in the same order, nothing dropped or repeated.
    assert _glued(c for b in cut for c in b) == _glued(c for b in plan[len(plan) - tail:] for c in b)
    assert tail <= len(cut) <= tail * pieces
    base, compression = pull
    for piece in cut:
        _pieces_are_contiguous_and_served_right(sizes, piece)
        assert len(base + chunk_uri(piece, compression)) < MAX_PULL_URL_LENGTH + 60  # as long as its bucket's at most


def _glued(chunks):
    """Chunks with the consecutive ranges of one instance joined."""
    out = []
    for c in chunks:
        if out and out[-1].instance_id == c.instance_id and out[-1].offset + out[-1].size == c.offset:
            last = out.pop()
            c = Chunk(c.instance_id, last.offset, last.size + c.size)
        out.append(c)
    return out


def test_taper_cuts_the_last_round_in_four():
    """The bench's CT study: 300 instances of 530 kB, 12 workers: the last 12 of 60 buckets are
    cut in four, and the pieces are about a quarter of a bucket."""
    sizes = {f"{i:08x}-00000000-00000000-00000000-00000000": 530_000 for i in range(300)}
    plan = plan_pull_buckets(sizes, 2_200_000, LOCAL, "gzip")
    tapered = taper(plan, 12)
    assert len(plan) == 60 and len(tapered) == 48 + 12 * 4
    assert all(bucket_size(b) in range(bucket_size(plan[-1]) // 4 - 1, 700_000) for b in tapered[48:])


def test_taper_leaves_small_plans_and_small_buckets_alone():
    sizes = {f"{i:08x}-00000000-00000000-00000000-00000000": 100_000 for i in range(4)}
    plan = plan_push_buckets(sizes, 150_000)
    assert len(plan) == 2
    tapered = taper(plan, 12)  # only the last bucket (half the plan), in pieces of >= 64 KiB
    assert tapered[0] == plan[0] and [bucket_size(b) for b in tapered[1:]] == [66_666, 66_667, 66_667]
    assert taper(plan, 0) == plan
    assert taper(plan, 12, pieces=1) == plan
    tiny = {f"{i:08x}-00000000-00000000-00000000-00000000": MIN_TAPERED_PIECE for i in range(8)}
    plan = plan_push_buckets(tiny, MIN_TAPERED_PIECE)
    assert taper(plan, 4) == plan  # a piece would be below MIN_TAPERED_PIECE
