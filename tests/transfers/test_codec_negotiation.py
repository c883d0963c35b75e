"""The negotiated codec between two of our daemons, and plain gzip for everyone else.

A asks for "gzip"; between two daemons that both advertise "shuffle-zstd" the buckets travel in
it (the job's Content says so in "Codec") and every instance arrives byte-identical, push, pull
and bidirectional. A daemon started with `Transfers.NegotiatedCodecs` false, a replay of the real
plugin, and a query with "StrictCompression" get plain gzip. A corrupt shuffle-zstd bucket is
detected by its decoder and fetched again.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.peers import Peers
from bench.harness import free_port
from tests.conftest import asgi_client
from tests.dicom_data import make_instance
from tests.faultproxy import Fault, FaultProxy
from tests.transfers.pair import Pair
from tests.transfers.test_pull_from_recorded_plugin import RECORDED_PEER_URL, recorded_peer
from tests.wire_samples import dataset as wire_dataset
from tests.wire_samples import exchanges

pytestmark = pytest.mark.slow

OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2}}
DISABLED = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2, "NegotiatedCodecs": False}}
CHUNKS = "/transfers/chunks/"
SZSTD = "shuffle-zstd"


def _dataset(study: str) -> list[bytes]:
    """6 CT instances of 39 kB (split in buckets of 16 KiB) and 4 MR of 10 kB, one study."""
    files = [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1",
                           sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i) for i in range(6)]
    files += [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.2",
                            sop_uid=f"{study}.2.{i}", InstanceNumber=i) for i in range(4)]
    return files


def _clear(*nodes) -> None:
    for node in nodes:
        for patient in node.http.get("/patients").json():
            assert node.http.delete(f"/patients/{patient}").status_code == 200


def _study(uploaded: list[dict]) -> list[dict]:
    return [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}]


class Recorder:
    """The proxy's rule: records nothing itself, injects `fault` on chosen chunk GETs."""

    def __init__(self) -> None:
        self.flip_first_chunk_gets = False

    def __call__(self, method: str, path: str, attempt: int) -> Fault | None:
        if self.flip_first_chunk_gets and method == "GET" and path.startswith(CHUNKS) and attempt == 1:
            return Fault.flip(3)
        return None


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Iterator[dict]:
    """`on`: A and B both advertise the codec, A reaches B directly (`b`, `b-bidir`) and through a
    fault proxy (`b-proxy`); `off`: B started with NegotiatedCodecs false, reached through a
    proxy that records what A sends."""
    rule_on, rule_off = Recorder(), Recorder()
    port_on, port_off = free_port(), free_port()
    with FaultProxy(f"http://127.0.0.1:{port_on}", rule_on) as proxy_on, \
            FaultProxy(f"http://127.0.0.1:{port_off}", rule_off) as proxy_off, \
            Pair(tmp_path_factory.mktemp("codec-on"), a=OPTIONS, b=OPTIONS, proxy_url=proxy_on.url,
                 port_b=port_on) as on, \
            Pair(tmp_path_factory.mktemp("codec-off"), a=OPTIONS, b=DISABLED, proxy_url=proxy_off.url,
                 port_b=port_off) as off:
        yield {"on": (on, proxy_on, rule_on), "off": (off, proxy_off, rule_off)}


def _chunk_compressions(proxy: FaultProxy) -> set[str]:
    return {httpx.URL(e.target).params.get("compression") for e in proxy.exchanges
            if e.method == "GET" and e.path.startswith(CHUNKS)}


# -- between two daemons that both advertise it --------------------------------------------------

@pytest.mark.parametrize("route, actor, peer, receiver", [
    ("pull", "a", "b-proxy", "a"), ("send", "a", "b-proxy", "b"), ("send", "a", "b-bidir", "b")])
def test_gzip_between_our_daemons_uses_the_codec_and_ends_byte_identical(pairs, route, actor, peer, receiver):
    pair, proxy, _ = pairs["on"]
    _clear(pair.a, pair.b)
    source = pair.b if route == "pull" else pair.a
    uploaded = source.upload(_dataset("7.1"))
    proxy.reset()
    job = getattr(pair, actor).transfer(route, peer, _study(uploaded), "gzip")

    assert job["State"] == "Success", job
    assert job["Content"]["Compression"] == "gzip"  # what was asked, as the plugin shows it
    assert job["Content"]["Codec"] == SZSTD  # what was used
    assert getattr(pair, receiver).md5s() == source.md5s()
    assert len(source.md5s()) == len(uploaded)
    if route == "pull":
        assert _chunk_compressions(proxy) == {SZSTD}
    elif peer == "b-proxy":
        created = next(e for e in proxy.exchanges if (e.method, e.path) == ("POST", "/transfers/push"))
        assert created.upstream_status == 200
        assert proxy.count("GET", "/transfers/capabilities") == 1


def test_strict_gzip_stays_gzip(pairs):
    pair, proxy, _ = pairs["on"]
    _clear(pair.a, pair.b)
    uploaded = pair.b.upload(_dataset("7.2"))
    proxy.reset()
    job = pair.a.transfer("pull", "b-proxy", _study(uploaded), "gzip", StrictCompression=True)

    assert job["State"] == "Success", job
    assert "Codec" not in job["Content"]
    assert _chunk_compressions(proxy) == {"gzip"}
    assert pair.a.md5s() == pair.b.md5s()


def test_none_stays_none(pairs):
    pair, proxy, _ = pairs["on"]
    _clear(pair.a, pair.b)
    uploaded = pair.b.upload(_dataset("7.3"))
    proxy.reset()
    job = pair.a.transfer("pull", "b-proxy", _study(uploaded), "none")
    assert job["State"] == "Success" and "Codec" not in job["Content"], job
    assert _chunk_compressions(proxy) == {"none"}


def test_a_corrupt_codec_bucket_is_detected_and_fetched_again(pairs):
    """The first chunk GET of each path gets 3 flipped bytes: the shuffle-zstd decoder (CRC-32
    per block, checked lengths) refuses each at once, the bucket is fetched again, the job
    succeeds and the instances are byte-identical."""
    pair, proxy, rule = pairs["on"]
    _clear(pair.a, pair.b)
    uploaded = pair.b.upload(_dataset("7.4"))
    proxy.reset()
    rule.flip_first_chunk_gets = True
    try:
        job = pair.a.transfer("pull", "b-proxy", _study(uploaded), "gzip")
    finally:
        rule.flip_first_chunk_gets = False

    assert job["State"] == "Success", job
    assert job["Content"]["Codec"] == SZSTD
    assert pair.a.md5s() == pair.b.md5s()
    per_target: dict[str, list] = {}
    for e in proxy.exchanges:
        if e.method == "GET" and e.path.startswith(CHUNKS):
            per_target.setdefault(e.target, []).append(e.fault.kind if e.fault else None)
    # The proxy counts attempts per path: of the two buckets of a split instance only the first
    # is flipped. A flipped bucket is fetched exactly once more (the decoder saw it, not the MD5
    # check, which would have fetched every bucket of the instance again).
    assert all(kinds in (["flip", None], [None]) for kinds in per_target.values()), per_target
    assert sum(kinds == ["flip", None] for kinds in per_target.values()) >= 6, per_target
    assert _chunk_compressions(proxy) == {SZSTD}


def test_a_chunk_request_in_the_codec_decodes_exactly(pairs):
    """The chunk route itself: the payload decodes (bounded) to exactly the gzip answer's bytes."""
    from protocol import codecs

    pair, _, _ = pairs["on"]
    _clear(pair.b)
    uploaded = pair.b.upload(_dataset("7.5")[:2])
    ids = ".".join(u["ID"] for u in uploaded)
    raw = pair.b.http.get(f"{CHUNKS}{ids}?offset=0&size=0&compression=none").content
    for level in ("", "&level=1", "&level=9"):
        answer = pair.b.http.get(f"{CHUNKS}{ids}?offset=0&size=0&compression={SZSTD}{level}")
        assert answer.status_code == 200
        assert codecs.decode(answer.content, SZSTD, len(raw)) == raw
    assert pair.b.http.get(f"{CHUNKS}{ids}?compression={SZSTD}&level=99").status_code == 400


# -- a peer that does not advertise it -------------------------------------------------------------

def test_a_daemon_with_the_codec_disabled_gets_plain_gzip(pairs):
    pair, proxy, _ = pairs["off"]
    assert pair.b.http.get("/transfers/capabilities").json() == {"Codecs": ["gzip", "none"]}
    # B refuses what it does not advertise, as the plugin refuses an unknown compression.
    assert pair.b.http.get(f"{CHUNKS}0?compression={SZSTD}").status_code == 400
    for route, source, receiver in (("pull", pair.b, pair.a), ("send", pair.a, pair.b)):
        _clear(pair.a, pair.b)
        uploaded = source.upload(_dataset("7.6"))
        proxy.reset()
        job = pair.a.transfer(route, "b-proxy", _study(uploaded), "gzip")

        assert job["State"] == "Success", job
        assert "Codec" not in job["Content"]
        assert receiver.md5s() == source.md5s()
        if route == "pull":
            assert _chunk_compressions(proxy) == {"gzip"}
            assert all("level=" not in e.target for e in proxy.exchanges)
        else:
            assert proxy.count("GET", "/transfers/capabilities") == 1
            assert proxy.count("POST", "/transfers/push") == 1


@pytest.mark.anyio
async def test_the_recorded_plugin_gets_plain_gzip(make_config, tmp_path_factory):
    """A pull from a replay of the real plugin (03a: gzip) asks exactly its recorded gzip URIs,
    and the capabilities question a pusher would ask is answered 404 there: plain gzip."""
    import anyio

    folder = "03a-pull-64k-gzip"
    wire_dataset(str(tmp_path_factory.getbasetemp() / "wire-samples-dataset"))
    records = exchanges(folder)
    query = records[0].record["request"]["body"]["json"]
    peer_app, asked = recorded_peer(folder)
    config = make_config({"Transfers": {"BucketSize": 64, "MaxHttpRetries": 0, "AdaptiveBucketSize": False},
                          "OrthancPeers": {"b": {"Url": RECORDED_PEER_URL}}})
    store = open_store(config)
    peers = Peers(config, transport_factory=lambda peer: httpx.ASGITransport(app=peer_app))
    app = create_app(config, store, peers_=peers)
    try:
        async with app.state.jobs.running(), asgi_client(app) as client:
            assert query["Compression"] == "gzip"
            created = await client.post("/transfers/pull", json=dict(query, Peer="b"))
            assert created.status_code == 200, created.text
            with anyio.fail_after(60):
                while (job := (await client.get(f"/jobs/{created.json()['ID']}")).json())["State"] not in (
                        "Success", "Failure"):
                    await anyio.sleep(0.05)
            assert job["State"] == "Success", (job, asked)
            assert "Codec" not in job["Content"]
            gets = [a for a in asked if a.startswith("GET ")]
            assert gets and all(a.endswith("&compression=gzip") for a in gets), gets
            assert await peers.get("b").codecs() == ()
            assert asked[-1] == "GET /transfers/capabilities"  # answered 404 by the replay
    finally:
        store.close()


def test_the_link_meter_picks_cheap_levels_for_fast_links_and_strong_ones_for_slow_links():
    from accelerator.transfers.download import LinkMeter
    from protocol import codecs

    meter = LinkMeter()
    assert meter.rate is None and meter.level(SZSTD) == 1 and meter.level("gzip") == codecs.GZIP_LEVEL
    meter.started -= 10.0  # 10 s for 30 MB: 3 MB/s, a 20-30 Mbit/s link
    meter.add(30_000_000)
    assert 2.9e6 < meter.rate < 3.1e6
    assert meter.level(SZSTD) == 6 and meter.level("gzip") == 6 and meter.level("none") is None
    meter.add(970_000_000)  # 100 MB/s: loopback or 1 Gbit/s
    assert meter.level(SZSTD) == 1 and meter.level("gzip") == codecs.GZIP_LEVEL
