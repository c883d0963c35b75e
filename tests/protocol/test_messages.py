"""protocol.messages: strict parsing and serialisation of the JSON objects of spec section 4."""

from __future__ import annotations

import copy

import pytest

from protocol.errors import BadFileFormat, ParameterOutOfRange
from protocol.messages import (
    Chunk,
    Created,
    InstanceInfo,
    LookupAnswer,
    PushTransaction,
    Resource,
    TransferQuery,
    bucket_size,
    bucket_to_json,
    format_size,
    parse_bucket,
    parse_compression,
    parse_lookup_request,
    parse_size,
    size_mb,
    validate_push_plan,
)
from protocol.resources import Level

DUMMY_CT = "66a662ce-7430e543-bad44d47-0dc5a943-ec7a538d"
DUMMY_MD5 = "3e29b869978b6db4886355a2b1132124"
OTHER = "e9a56203-99c10380-276c408d-73f8b513-c2ef9e0c"
MD5_0 = "0" * 32


def _errors_by_status(exchange):
    """The error class a captured 400 answer stands for (OrthancStatus 3 or 15)."""
    status = exchange["response"]["body"]["json"]["OrthancStatus"]
    return {3: ParameterOutOfRange, 15: BadFileFormat}[status]


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, value", [("0", 0), ("2472", 2472), ("20973268", 20973268),
                                         (str(2**63 - 1), 2**63 - 1)])
def test_sizes_are_canonical_decimal_strings(text, value):
    assert parse_size(text) == value
    assert format_size(value) == text


@pytest.mark.parametrize("bad", [2472, 2472.0, True, None, [], "-1", "+1", "01", " 1", "1 ", "1.0",
                                 "1e3", "0x10", "", "\u0663", "1_000", str(2**63), "9" * 5000])
def test_sizes_reject_numbers_signs_and_non_decimals(bad):
    with pytest.raises(BadFileFormat):
        parse_size(bad)


@pytest.mark.parametrize("n, mb", [(0, 0), (500 * 1024, 0), (524287, 0), (524288, 1), (1000 * 1024, 1),
                                   (2048 * 1024, 2), (1572864, 2), (1572863, 1), (868406, 1),
                                   (436158, 0), (21469468, 20)])
def test_size_mb_rounds_half_away_from_zero(n, mb):
    assert size_mb(n) == mb


def test_compression_is_exact_and_case_sensitive():
    assert parse_compression("gzip") == "gzip"
    assert parse_compression("none") == "none"
    for bad in ("None", "GZIP", "zip", "zstd", ""):
        with pytest.raises(ParameterOutOfRange):
            parse_compression(bad)
    with pytest.raises(BadFileFormat):
        parse_compression(None)


# --------------------------------------------------------------------------- InstanceInfo


def test_instance_info_spec_example_round_trips():
    wire = {"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472"}
    info = InstanceInfo.from_json(wire)
    assert info == InstanceInfo(DUMMY_CT, 2472, DUMMY_MD5)
    assert info.to_json() == wire


@pytest.mark.parametrize("mutation", [
    {"Size": 2472},                      # numeric size: 400 like the plugin (folder 06, #55)
    {"Size": "-1"},
    {"MD5": DUMMY_MD5.upper()},          # MD5s are compared case-sensitively: only lowercase
    {"MD5": DUMMY_MD5[:-1]},
    {"MD5": 42},
    {"ID": "not-an-orthanc-id"},
    {"ID": DUMMY_CT.upper()},
    {"ID": 42},
])
def test_instance_info_rejects_bad_fields(mutation):
    wire = {"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472", **mutation}
    with pytest.raises(BadFileFormat):
        InstanceInfo.from_json(wire)


@pytest.mark.parametrize("missing", ["ID", "MD5", "Size"])
def test_instance_info_requires_every_field(missing):
    wire = {"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472"}
    del wire[missing]
    with pytest.raises(BadFileFormat):
        InstanceInfo.from_json(wire)


def test_instance_info_ignores_unknown_fields():
    wire = {"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472", "Extra": [1, 2]}
    assert InstanceInfo.from_json(wire).to_json() == {"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472"}


# --------------------------------------------------------------------------- lookup


def test_lookup_spec_example_answer():
    answer = LookupAnswer.build([InstanceInfo(DUMMY_CT, 2472, DUMMY_MD5)], "e2501420-8a3f-49d5-8ee3-b4bf1bf2fa5d")
    assert answer.to_json() == {
        "CountInstances": 1,
        "Instances": [{"ID": DUMMY_CT, "MD5": DUMMY_MD5, "Size": "2472"}],
        "Originator": "e2501420-8a3f-49d5-8ee3-b4bf1bf2fa5d",
        "TotalSize": "2472",
        "TotalSizeMB": 0,
    }


def test_lookup_answer_build_sorts_and_deduplicates():
    a = InstanceInfo("f" * 8 + "-00000000-00000000-00000000-00000000", 5, MD5_0)
    b = InstanceInfo("0" * 8 + "-00000000-00000000-00000000-00000000", 7, MD5_0)
    answer = LookupAnswer.build([a, b, a], "x")
    assert answer.instances == (b, a)
    assert (answer.count_instances, answer.total_size) == (2, 12)


def test_lookup_answers_captured_from_the_plugin_are_reproduced(wire):
    answers = [e for e in wire.exchanges("02-lookup") if e["status"] == 200]
    assert len(answers) == 7
    for exchange in answers:
        captured = exchange["response"]["body"]["json"]
        parsed = LookupAnswer.from_json(captured)
        assert parsed.to_json() == captured  # counters, TotalSize string and TotalSizeMB derived alike
        rebuilt = LookupAnswer.build(reversed(parsed.instances), parsed.originator)
        assert rebuilt.to_json() == captured  # the plugin's order is ascending ID order
        for info in parsed.instances:
            assert (info.size, info.md5) == (wire.files[info.id]["size"], wire.files[info.id]["md5"])


def test_lookup_answer_needs_instances_and_originator():
    good = {"Instances": [], "Originator": "u"}
    assert LookupAnswer.from_json(good).instances == ()
    for bad in ({"Originator": "u"}, {"Instances": []}, {"Instances": {}, "Originator": "u"},
                {"Instances": [], "Originator": 1}, []):
        with pytest.raises(BadFileFormat):
            LookupAnswer.from_json(bad)


def test_lookup_answer_originator_is_a_short_identifier():
    """It is quoted in a failed job's details: a 50 MB one would land there whole."""
    for bad in ("x" * 65, "x" * 50_000_000, "a b", "a\nb", "", "é"):
        with pytest.raises(BadFileFormat) as info:
            LookupAnswer.from_json({"Instances": [], "Originator": bad})
        assert len(str(info.value)) < 200


def test_lookup_requests_captured_are_parsed_or_refused_like_the_plugin(wire):
    for exchange in wire.exchanges("02-lookup"):
        if exchange["method"] != "POST" or exchange["request"]["body"]["kind"] != "json":
            continue
        body = exchange["request"]["body"]["json"]
        if exchange["status"] == 400:
            with pytest.raises(_errors_by_status(exchange)):
                parse_lookup_request(body)
        else:  # 200, or 404 found later when the store is asked
            resources = parse_lookup_request(body)
            assert [r.to_json() for r in resources] == [{"ID": r["ID"], "Level": r["Level"]} for r in body]


def test_resource_keeps_the_level_verbatim_and_parses_it_on_demand():
    resource = Resource.from_json({"Level": "studies", "ID": "abc"})
    assert resource.to_json() == {"Level": "studies", "ID": "abc"}
    assert resource.parsed_level is Level.STUDY
    with pytest.raises(ParameterOutOfRange):
        Resource("Foo", "abc").parsed_level  # noqa: B018


# --------------------------------------------------------------------------- TransferQuery


def _study_query(**extra):
    return {"Resources": [{"Level": "Study", "ID": "38fc7521-9de8fa28-0af0b6e1-82780f6a-ad0fe52a"}],
            "Compression": "gzip", "Peer": "b", **extra}


def test_transfer_query_optional_fields():
    query = TransferQuery.from_json(_study_query())
    assert (query.priority, query.job_priority, query.originator, query.sender_transfer_id) == (None, 0, None, None)
    query = TransferQuery.from_json(_study_query(Priority=-10, Originator="o", SenderTransferID="s", Foo=1))
    assert (query.priority, query.job_priority, query.originator, query.sender_transfer_id) == (-10, -10, "o", "s")
    assert query.to_json() == _study_query(Priority=-10, Originator="o", SenderTransferID="s")


@pytest.mark.parametrize("priority", ["10", 10.0, 10.5, True, None, [10], 2**31])
def test_transfer_query_priority_must_be_a_json_integer(priority):
    with pytest.raises(BadFileFormat):
        TransferQuery.from_json(_study_query(Priority=priority))


@pytest.mark.parametrize("body, error", [
    (_study_query(Compression="None"), ParameterOutOfRange),
    (_study_query(Compression=1), BadFileFormat),
    (_study_query(Peer=3), BadFileFormat),
    (_study_query(Resources={}), BadFileFormat),
    (_study_query(Resources=[{"Level": "Study"}]), BadFileFormat),
    (_study_query(Originator=1), BadFileFormat),
    (_study_query(SenderTransferID=42), BadFileFormat),
    ([], BadFileFormat),
])
def test_transfer_query_rejects(body, error):
    with pytest.raises(error):
        TransferQuery.from_json(body)


def test_transfer_queries_captured_are_parsed_or_refused_like_the_plugin(wire):
    checked = 0
    for folder in ("03a-pull-64k-gzip", "03b-pull-64k-none", "04a-push-64k-gzip", "05-bidirectional-64k-gzip",
                   "06-errors-and-edge-cases"):
        for exchange in wire.exchanges(folder):
            if exchange["path"].rstrip("/").lstrip("/") not in ("transfers/send", "transfers/pull"):
                continue
            if exchange["method"] != "POST":
                continue
            body = exchange["request"]["body"]["json"]
            checked += 1
            if exchange["status"] == 400:
                with pytest.raises(_errors_by_status(exchange)):
                    TransferQuery.from_json(body)
                continue
            query = TransferQuery.from_json(body)  # 200, or 404 for an unknown peer (checked later)
            assert query.to_json() == body  # verbatim: the Level "Foo" of #94 included
    assert checked >= 15


def test_bidirectional_trigger_body_is_a_transfer_query(wire):
    exchange = wire.exchanges("05-bidirectional-64k-gzip")[1]
    assert exchange["target"] == "//transfers/pull"
    query = TransferQuery.from_json(exchange["request"]["body"]["json"])
    assert query.priority is None and query.originator == "900d01f1-57a3-4207-88ac-531bf7cff418"
    assert query.peer == "a-via-proxy" and len(query.resources) == 3


# --------------------------------------------------------------------------- chunks, buckets, push


def test_chunk_and_bucket_round_trip():
    wire = [{"ID": DUMMY_CT, "Offset": "0", "Size": "9926"}, {"ID": OTHER, "Offset": "0", "Size": "1000"}]
    bucket = parse_bucket(wire)
    assert bucket == (Chunk(DUMMY_CT, 0, 9926), Chunk(OTHER, 0, 1000))
    assert bucket_size(bucket) == 10926
    assert bucket_to_json(bucket) == wire


@pytest.mark.parametrize("chunk", [
    {"ID": DUMMY_CT, "Offset": 0, "Size": "1"},
    {"ID": DUMMY_CT, "Offset": "0", "Size": 1},
    {"ID": DUMMY_CT, "Offset": "0"},
    {"ID": "../etc", "Offset": "0", "Size": "1"},
    [DUMMY_CT, "0", "1"],
])
def test_chunk_rejects_bad_fields(chunk):
    with pytest.raises(BadFileFormat):
        parse_bucket([chunk])


def test_push_creations_captured_round_trip(wire):
    for folder, count in (("04a-push-64k-gzip", 9), ("04b-push-64k-none", 9), ("04c-push-4m-small-gzip", 1),
                          ("04d-push-4m-large-gzip", 4)):
        body = wire.exchanges(folder)[1]["request"]["body"]["json"]
        transaction = PushTransaction.from_json(body)
        assert len(transaction.buckets) == count
        assert transaction.to_json() == body
        validate_push_plan(transaction)  # plans made by the plugin are always consistent


def test_push_creations_captured_in_folder_06(wire):
    """#52-55 are refused by the plugin at creation; #19, 37, 56, 59, 62 are accepted by it, and
    our extra plan check refuses exactly the inconsistent ones (#56 too long, #59 undeclared)."""
    by_seq = {e["seq"]: e for e in wire.exchanges("06-errors-and-edge-cases")}
    for seq in (52, 53, 54, 55):
        with pytest.raises(_errors_by_status(by_seq[seq])):
            PushTransaction.from_json(by_seq[seq]["request"]["body"]["json"])
    for seq in (19, 37, 62):
        validate_push_plan(PushTransaction.from_json(by_seq[seq]["request"]["body"]["json"]))
    for seq, message in ((56, "past the end"), (59, "undeclared")):
        transaction = PushTransaction.from_json(by_seq[seq]["request"]["body"]["json"])
        with pytest.raises(BadFileFormat, match=message):
            validate_push_plan(transaction)


def _transaction(buckets, sizes=None):
    sizes = sizes or {DUMMY_CT: 100, OTHER: 50}
    return PushTransaction(
        instances=tuple(InstanceInfo(i, s, MD5_0) for i, s in sizes.items()),
        buckets=tuple(tuple(Chunk(*c) for c in b) for b in buckets),
        compression="none",
    )


def test_validate_push_plan_accepts_any_exact_cover_in_any_order():
    validate_push_plan(_transaction([[(OTHER, 0, 50), (DUMMY_CT, 60, 40)], [(DUMMY_CT, 0, 60), (DUMMY_CT, 7, 0)]]))


@pytest.mark.parametrize("buckets, message", [
    ([[(DUMMY_CT, 0, 100)]], "uncovered"),                                  # OTHER never sent
    ([[(DUMMY_CT, 0, 50), (DUMMY_CT, 51, 49)], [(OTHER, 0, 50)]], "uncovered"),   # one-byte gap
    ([[(DUMMY_CT, 0, 99)], [(OTHER, 0, 50)]], "uncovered"),                 # tail missing
    ([[(DUMMY_CT, 0, 60), (DUMMY_CT, 59, 41)], [(OTHER, 0, 50)]], "overlap"),
    ([[(DUMMY_CT, 0, 100)], [(OTHER, 0, 50)], [(OTHER, 0, 50)]], "overlap"),   # sent twice
    ([[(DUMMY_CT, 0, 101)], [(OTHER, 0, 50)]], "past the end"),
    ([[(DUMMY_CT, 0, 100)], [(OTHER, 50, 1)], [(OTHER, 0, 50)]], "past the end"),
])
def test_validate_push_plan_refuses_inconsistent_plans(buckets, message):
    with pytest.raises(BadFileFormat, match=message):
        validate_push_plan(_transaction(buckets))


def test_push_transaction_refuses_duplicate_instances():
    body = _transaction([[(DUMMY_CT, 0, 100)], [(OTHER, 0, 50)]]).to_json()
    PushTransaction.from_json(body)
    duplicated = copy.deepcopy(body)
    duplicated["Instances"].append(dict(duplicated["Instances"][0]))
    with pytest.raises(BadFileFormat, match="twice"):
        PushTransaction.from_json(duplicated)


@pytest.mark.parametrize("key", ["Instances", "Buckets", "Compression"])
def test_push_transaction_requires_every_member(key):
    body = _transaction([[(DUMMY_CT, 0, 100)], [(OTHER, 0, 50)]]).to_json()
    del body[key]
    with pytest.raises(BadFileFormat):
        PushTransaction.from_json(body)


def test_push_transaction_buckets_must_be_arrays_of_arrays():
    body = _transaction([[(DUMMY_CT, 0, 100)], [(OTHER, 0, 50)]]).to_json()
    body["Buckets"] = [body["Buckets"][0][0]]
    with pytest.raises(BadFileFormat):
        PushTransaction.from_json(body)


# --------------------------------------------------------------------------- creation answers


def test_created_answers():
    assert Created.job("j1").to_json() == {"ID": "j1", "Path": "/jobs/j1"}
    assert Created.push_transaction("t1").to_json() == {"ID": "t1", "Path": "/transfers/push/t1"}
    for bad in ({"ID": "x"}, {"Path": "/x"}, {"ID": 1, "Path": "/x"}, ["x"]):
        with pytest.raises(BadFileFormat):
            Created.from_json(bad)


@pytest.mark.parametrize("field, value", [
    ("ID", "j" * 50_000_000), ("ID", "j" * 65), ("ID", "../x"), ("ID", "a b"), ("ID", ""),
    ("Path", "/jobs/" + "j" * 50_000_000), ("Path", "jobs/x"), ("Path", "/jobs/x?y=1"),
    ("Path", "/jobs/x#y"), ("Path", "//evil.example/x"), ("Path", "/" + "/a" * 9), ("Path", "/"),
])
def test_created_answers_are_short_identifiers_and_paths(field, value):
    """Both are echoed in our answers and used in our URLs: a 50 MB field is refused, quoted
    in a few characters only."""
    good = {"ID": "5f3a86ea-6e2d-4b5b-9f60-2b0cda6b1c83", "Path": "/transfers/push/5f3a86ea-6e2d-4b5b"}
    assert Created.from_json(good) == Created(good["ID"], good["Path"])
    with pytest.raises(BadFileFormat) as info:
        Created.from_json(dict(good, **{field: value}))
    assert len(str(info.value)) < 200 and f"Creation answer {field}" in str(info.value)


def test_creation_answers_captured_parse(wire):
    pull = wire.exchanges("03a-pull-64k-gzip")[0]["response"]["body"]["json"]
    created = Created.from_json(pull)
    assert created == Created.job(created.id)
    push = wire.exchanges("04a-push-64k-gzip")[1]["response"]["body"]["json"]
    created = Created.from_json(push)
    assert created == Created.push_transaction(created.id)
