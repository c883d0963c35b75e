"""accelerator.api.transfers: source and receiver routes, in-process, with real DICOM data."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import zlib

import pytest

from accelerator.api.app import TRANSFERS_FOLDER, create_app, open_store
from protocol import codecs
from protocol.chunks import chunk_uri
from protocol.messages import InstanceInfo, PushTransaction, bucket_size
from protocol.planner import plan_push_buckets
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio


def _study(n: int, *, series="1.2.3.4", source="CT_small.dcm") -> dict[str, bytes]:
    files = [make_instance(series_uid=series, sop_uid=f"{series}.{i}", InstanceNumber=i, source=source)
             for i in range(1, n + 1)]
    from accelerator.store.dicom import parse_bytes

    return {parse_bytes(d).ids.instance: d for d in files}


def _push_plan(files: dict[str, bytes], bucket: int, compression: str):
    """A push transaction as a real pusher builds it, and the wire payload of each bucket."""
    infos = [InstanceInfo(i, len(d), hashlib.md5(d).hexdigest()) for i, d in sorted(files.items())]
    buckets = plan_push_buckets(infos, bucket)
    payloads = [codecs.encode(b"".join(files[c.instance_id][c.offset:c.end] for c in b), compression)
                for b in buckets]
    return PushTransaction(tuple(infos), tuple(buckets), compression), payloads


@pytest.fixture
async def source(make_config):
    """A daemon holding a 6-instance CT series (39 kB each)."""
    config = make_config({"Transfers": {"Threads": 2}})
    store = open_store(config)
    files = _study(6)
    for data in files.values():
        store.ingest_bytes(data)
    async with asgi_client(create_app(config, store)) as client:
        client.files = files
        yield client
    store.close()


# -- plugin detection --------------------------------------------------------------------------

async def test_plugins(client):
    assert "transfers" in (await client.get("/plugins")).json()
    plugin = (await client.get("/plugins/transfers")).json()
    assert plugin["ID"] == "transfers" and plugin["Version"] >= "1.6"


# -- lookup ------------------------------------------------------------------------------------

async def test_lookup_expands_deduplicates_and_sorts(source):
    ids = sorted(source.files)
    study = (await source.get(f"/instances/{ids[0]}/study")).json()["ID"]
    answer = await source.post("/transfers/lookup", json=[
        {"Level": "studies", "ID": study}, {"Level": "Instance", "ID": ids[2]}])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert [i["ID"] for i in body["Instances"]] == ids
    for info in body["Instances"]:
        data = source.files[info["ID"]]
        assert info == {"ID": info["ID"], "MD5": hashlib.md5(data).hexdigest(), "Size": str(len(data))}
    assert body["CountInstances"] == 6 and body["TotalSize"] == str(sum(map(len, source.files.values())))
    assert body["TotalSizeMB"] == 0 and len(body["Originator"]) == 36
    again = (await source.post("/transfers/lookup", json=[])).json()
    assert again["Originator"] == body["Originator"] and again["Instances"] == []


@pytest.mark.parametrize("body, status", [
    ([{"Level": "Study", "ID": "00000000-00000000-00000000-00000000-00000000"}], 404),
    ([{"Level": "Foo", "ID": "x"}], 400),
    ({"Level": "Study", "ID": "x"}, 400),
    ([{"Level": "Study"}], 400),
    ([{"Level": "Study", "ID": 42}], 400),
])
async def test_lookup_errors(source, body, status):
    answer = await source.post("/transfers/lookup", json=body)
    assert answer.status_code == status
    assert answer.json()["HttpStatus"] == status


async def test_lookup_of_truncated_json_is_400(source):
    answer = await source.post("/transfers/lookup", content=b'[{"Level": "Stu')
    assert answer.status_code == 400


# -- chunks ------------------------------------------------------------------------------------

async def test_chunks_follow_the_skip_semantics(source):
    ids = sorted(source.files)
    first, second = source.files[ids[0]], source.files[ids[1]]
    both = f"/transfers/chunks/{ids[0]}.{ids[1]}"
    cases = {
        f"{both}?offset=0&size=0&compression=none": first + second,
        f"{both}?offset=100&size=50": first[100:150],
        f"{both}?offset={len(first) - 10}&size=30": first[-10:] + second[:20],
        f"{both}?offset={len(first) + 5}&size=10": second[5:15],
        f"{both}?offset={len(first) + len(second)}&size=10": b"",
        f"/transfers/chunks/{ids[0]}": first,
        f"/transfers/chunks/{ids[0]}?offset=0&size=16&foo=bar": first[:16],
        f"/transfers/chunks/{ids[0]}.00000000-00000000-00000000-00000000-00000000?offset=0&size=100": first[:100],
    }
    for uri, expected in cases.items():
        answer = await source.get(uri)
        assert answer.status_code == 200, uri
        assert answer.content == expected and answer.headers["content-length"] == str(len(expected)), uri
        assert answer.headers["content-type"] == "application/octet-stream"
        assert "content-encoding" not in answer.headers


async def test_gzip_chunks_are_one_member(source):
    ids = sorted(source.files)
    answer = await source.get(f"/transfers/chunks/{'.'.join(ids)}?offset=7&size=200000&compression=gzip")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/gzip"
    raw = b"".join(source.files[i] for i in ids)[7:200007]
    assert gzip.decompress(answer.content) == raw
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(answer.content) == raw and inflater.eof and not inflater.unused_data


@pytest.mark.parametrize("query, status", [
    ("offset=-1&size=10", 400), ("offset=abc", 400), ("size=2147483648", 400),
    ("compression=NONE", 400), ("compression=zip", 400),
])
async def test_chunk_argument_errors(source, query, status):
    ids = sorted(source.files)
    answer = await source.get(f"/transfers/chunks/{ids[0]}?{query}")
    assert answer.status_code == status


async def test_chunk_of_unknown_or_malformed_ids_is_404(source):
    for uri in ("/transfers/chunks/00000000-00000000-00000000-00000000-00000000?size=10",
                "/transfers/chunks/not-an-id?size=10", "/transfers/chunks/..%2F..%2Fetc?size=1",
                "/transfers/chunks/../../etc/passwd"):
        assert (await source.get(uri)).status_code == 404, uri


async def test_chunks_reassemble_planned_pull_buckets(source):
    """Every bucket a real puller would plan, fetched and decoded, rebuilds every instance."""
    from protocol.planner import plan_pull_buckets

    ids = sorted(source.files)
    sizes = [(i, len(source.files[i])) for i in ids]
    rebuilt = {i: bytearray(len(source.files[i])) for i in ids}
    for compression in ("none", "gzip"):
        for bucket in plan_pull_buckets(sizes, 30_000, "http://127.0.0.1:8042/", compression):
            answer = await source.get(chunk_uri(bucket, compression))
            payload = codecs.decode(answer.content, compression, bucket_size(bucket))
            position = 0
            for chunk in bucket:
                rebuilt[chunk.instance_id][chunk.offset:chunk.end] = payload[position:position + chunk.size]
                position += chunk.size
        assert {i: bytes(b) for i, b in rebuilt.items()} == source.files


# -- push receiver -----------------------------------------------------------------------------

async def _push(client, plan, payloads, *, commit=True, indices=None):
    created = await client.post("/transfers/push", json=plan.to_json())
    assert created.status_code == 200, created.text
    path = created.json()["Path"]
    for index, payload in zip(indices or range(len(payloads)), payloads):
        put = await client.put(f"{path}/{index}", content=payload,
                               headers={"Content-Type": "application/octet-stream"})
        assert put.status_code == 200 and put.json() == {}, put.text
    if commit:
        done = await client.post(f"{path}/commit")
        assert done.status_code == 200 and done.json() == {}, done.text
    return path


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_push_stores_byte_identical_instances(client, compression):
    files = _study(5) | _study(3, series="9.9", source="MR_small.dcm")
    plan, payloads = _push_plan(files, 15_000, compression)
    assert any(len(b) > 1 for b in plan.buckets) and any(b[0].offset for b in plan.buckets)  # groups, splits
    path = await _push(client, plan, payloads)
    assert path.startswith("/transfers/push/")
    for instance, data in files.items():
        assert (await client.get(f"/instances/{instance}/file")).content == data
    stats = (await client.get("/statistics")).json()
    assert stats["CountInstances"] == 8 and stats["TotalDiskSize"] == str(sum(map(len, files.values())))
    assert (await client.post(f"{path}/commit")).status_code == 404  # the transaction is gone


async def test_empty_push_transaction_commits(client):
    plan = PushTransaction((), (), "gzip")
    await _push(client, plan, [])


async def test_commit_with_a_missing_bucket_stores_nothing_and_keeps_the_transaction(client):
    files = _study(4)
    plan, payloads = _push_plan(files, 60_000, "gzip")
    assert len(payloads) > 1
    path = await _push(client, plan, payloads[1:], commit=False, indices=range(1, len(payloads)))
    failed = await client.post(f"{path}/commit")
    assert failed.status_code == 500 and failed.json()["OrthancStatus"] == 20
    assert "Bad MD5" in failed.json()["Details"]
    assert (await client.get("/instances")).json() == []  # nothing became visible
    put = await client.put(f"{path}/0", content=payloads[0])
    assert put.status_code == 200
    assert (await client.post(f"{path}/commit")).status_code == 200
    assert sorted((await client.get("/instances")).json()) == sorted(files)


async def test_corrupted_bytes_fail_the_commit_and_nothing_is_stored(client):
    files = _study(2)
    plan, payloads = _push_plan(files, 10_000_000, "none")
    corrupted = payloads[0][:-1] + bytes([payloads[0][-1] ^ 0xFF])
    path = await _push(client, plan, [corrupted], commit=False)
    answer = await client.post(f"{path}/commit")
    assert answer.status_code == 500 and sorted(files)[-1] in answer.json()["Details"]
    assert (await client.post(f"{path}/commit")).status_code == 500  # still there, still bad
    assert (await client.get("/statistics")).json()["CountInstances"] == 0
    assert (await client.delete(path)).status_code == 200
    assert (await client.delete(path)).status_code == 404


async def test_wrong_md5_declared_by_the_pusher(client):
    files = _study(1)
    plan, payloads = _push_plan(files, 1_000_000, "none")
    info = plan.instances[0]
    lying = PushTransaction((InstanceInfo(info.id, info.size, "0" * 32),), plan.buckets, "none")
    path = await _push(client, lying, payloads, commit=False)
    assert (await client.post(f"{path}/commit")).status_code == 500
    assert (await client.get(f"/instances/{info.id}")).status_code == 404


@pytest.mark.parametrize("mangle, needle", [
    (lambda p: p[:-1], "size"),                           # one byte short
    (lambda p: p + b"\0", "expected"),                      # one byte long (none)
])
async def test_wrong_bucket_length_is_500(client, mangle, needle):
    files = _study(1)
    plan, payloads = _push_plan(files, 1_000_000, "none")
    created = (await client.post("/transfers/push", json=plan.to_json())).json()
    answer = await client.put(f"{created['Path']}/0", content=mangle(payloads[0]))
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 9
    assert needle in answer.json()["Details"]


async def test_a_rejected_bucket_leaves_no_bytes_behind(client):
    files = _study(1)
    plan, payloads = _push_plan(files, 1_000_000, "none")
    created = (await client.post("/transfers/push", json=plan.to_json())).json()
    answer = await client.put(f"{created['Path']}/0", content=payloads[0][:-1])
    assert answer.status_code == 500
    tx = client._transport.app.state.receiver.get(created["ID"])
    instance = plan.instances[0]
    assert tx.area.path_of(instance.id).read_bytes() == bytes(instance.size)  # still all zeros
    assert sorted(p.name for p in tx.area.folder.iterdir()) == sorted([instance.id, "plan.json"])


@pytest.mark.parametrize("payload_of", [
    lambda raw: raw,                                         # raw bytes into a gzip transaction
    lambda raw: gzip.compress(raw)[:-8] + b"\0" * 8,         # bad CRC / ISIZE
    lambda raw: gzip.compress(raw)[:100],                    # truncated
    lambda raw: gzip.compress(raw[:500]) + gzip.compress(raw[500:]),  # two members
    lambda raw: gzip.compress(raw + b"x"),                   # inflates one byte too long
])
async def test_corrupt_gzip_buckets_are_500_and_store_nothing(client, payload_of):
    files = _study(1)
    plan, _ = _push_plan(files, 1_000_000, "gzip")
    raw = next(iter(files.values()))
    created = (await client.post("/transfers/push", json=plan.to_json())).json()
    answer = await client.put(f"{created['Path']}/0", content=payload_of(raw))
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 9
    assert (await client.post(f"{created['Path']}/commit")).status_code == 500
    assert (await client.get("/instances")).json() == []


async def test_gzip_bomb_is_refused_without_inflating(client):
    files = _study(1)
    plan, _ = _push_plan(files, 1_000_000, "gzip")
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024), 1)  # 200 MiB of zeros in ~200 kB
    created = (await client.post("/transfers/push", json=plan.to_json())).json()
    answer = await client.put(f"{created['Path']}/0", content=bomb)
    assert answer.status_code in (413, 500)


async def test_oversized_put_body_is_413(client):
    files = _study(1)
    plan, payloads = _push_plan(files, 1_000_000, "none")
    created = (await client.post("/transfers/push", json=plan.to_json())).json()
    answer = await client.put(f"{created['Path']}/0", content=payloads[0] * 3)
    assert answer.status_code == 413


async def test_bucket_index_and_transaction_errors(client):
    files = _study(2)
    plan, payloads = _push_plan(files, 1_000_000, "none")
    path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
    assert (await client.put(f"{path}/1", content=b"x")).status_code == 400        # out of range
    assert (await client.put(f"{path}/{'9' * 25}", content=b"x")).status_code == 404  # overflow
    assert (await client.put(f"{path}/abc", content=b"x")).status_code == 404       # no route
    unknown = "/transfers/push/0123abcd-0000-0000-0000-000000000000"
    assert (await client.put(f"{unknown}/0", content=b"x")).status_code == 404
    assert (await client.post(f"{unknown}/commit")).status_code == 404
    assert (await client.delete(unknown)).status_code == 404
    assert (await client.get(path)).status_code == 405
    assert (await client.get(path)).headers["allow"] == "DELETE"


@pytest.mark.parametrize("mutate, needle", [
    (lambda j: j["Buckets"][0].__setitem__(0, {**j["Buckets"][0][0], "Size": str(int(j["Buckets"][0][0]["Size"]) + 1)}),
     "past the end"),
    (lambda j: j["Buckets"][0].append({"ID": "11111111-11111111-11111111-11111111-11111111", "Offset": "0", "Size": "5"}),
     "undeclared"),
    (lambda j: j["Buckets"].pop(), "uncovered"),
    (lambda j: j["Buckets"].append(j["Buckets"][0]), "overlap"),
    (lambda j: j["Instances"].append(j["Instances"][0]), "declared twice"),
    (lambda j: j["Instances"][0].__setitem__("ID", "../../etc/passwd"), "Orthanc identifier"),
    (lambda j: j["Instances"][0].__setitem__("Size", 12), "string"),
    (lambda j: j.__setitem__("Compression", "zip"), ""),
    (lambda j: j.pop("Buckets"), "Buckets"),
])
async def test_inconsistent_plans_are_refused_at_creation(client, mutate, needle):
    files = _study(2)
    plan, _ = _push_plan(files, 40_000, "none")
    body = plan.to_json()
    mutate(body)
    answer = await client.post("/transfers/push", json=body)
    assert answer.status_code == 400, answer.text
    assert needle.lower() in answer.json().get("Details", "").lower()
    assert client._transport.app.state.receiver.ids() == []


async def test_no_file_outside_the_storage_area_is_touched(client, tmp_path):
    storage = tmp_path / "storage"
    files = _study(3)
    plan, payloads = _push_plan(files, 40_000, "gzip")
    await _push(client, plan, payloads)
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(storage)]
    assert outside == []
    assert not list((storage / TRANSFERS_FOLDER / "push").iterdir())  # committed: cleaned up


async def test_concurrent_transactions_and_buckets(client):
    studies = [_study(4, series=f"5.5.{n}") for n in range(3)]
    plans = [_push_plan(files, 30_000, "gzip") for files in studies]
    paths = [(await client.post("/transfers/push", json=p.to_json())).json()["Path"] for p, _ in plans]

    async def put(path, index, payload):
        answer = await client.put(f"{path}/{index}", content=payload)
        assert answer.status_code == 200

    await asyncio.gather(*(put(path, i, payload) for path, (_, payloads) in zip(paths, plans)
                           for i, payload in enumerate(payloads)))
    commits = await asyncio.gather(*(client.post(f"{path}/commit") for path in paths))
    assert [c.status_code for c in commits] == [200, 200, 200]
    assert (await client.get("/statistics")).json()["CountInstances"] == 12


async def test_idle_transactions_are_evicted_oldest_first(make_config):
    config = make_config({"HttpTimeout": 0, "Transfers": {"MaxPushTransactions": 2}})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        plan, payloads = _push_plan(_study(1), 1_000_000, "none")
        paths = [(await client.post("/transfers/push", json=plan.to_json())).json()["Path"] for _ in range(3)]
        assert (await client.put(f"{paths[0]}/0", content=payloads[0])).status_code == 404
        assert (await client.put(f"{paths[1]}/0", content=payloads[0])).status_code == 200
    store.close()


async def test_transactions_survive_a_restart_between_buckets(make_config):
    config = make_config()
    files = _study(4)
    plan, payloads = _push_plan(files, 40_000, "gzip")
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        path = await _push(client, plan, payloads[:2], commit=False)
    store.close()

    store = open_store(config)  # a new process: a new store and a new app
    async with asgi_client(create_app(config, store)) as client:
        for index in range(2, len(payloads)):
            assert (await client.put(f"{path}/{index}", content=payloads[index])).status_code == 200
        assert (await client.post(f"{path}/commit")).status_code == 200
        for instance, data in files.items():
            assert (await client.get(f"/instances/{instance}/file")).content == data
    store.close()


async def test_push_of_a_non_dicom_payload_with_matching_md5_fails_cleanly(client):
    junk = b"not a DICOM file at all" * 10
    info = InstanceInfo("22222222-22222222-22222222-22222222-22222222", len(junk), hashlib.md5(junk).hexdigest())
    from protocol.messages import Chunk

    plan = PushTransaction((info,), ((Chunk(info.id, 0, len(junk)),),), "none")
    path = await _push(client, plan, [junk], commit=False)
    answer = await client.post(f"{path}/commit")
    assert answer.status_code == 500 and "Cannot import" in answer.json()["Details"]
    assert (await client.get("/instances")).json() == []
    assert (await client.delete(path)).status_code == 200
