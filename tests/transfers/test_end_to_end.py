"""Two real daemons on loopback: push, pull and bidirectional send, with gzip and none, for single
instances, studies, multi-study patients and split instances; a daemon that is its own peer; the
job JSON against the real plugin's."""

from __future__ import annotations

import pytest

from tests.dicom_data import make_instance
from tests.transfers.pair import Pair
from tests.wire_samples import exchange, require_samples

pytestmark = pytest.mark.slow

MODES = {  # route, node that acts, peer it names, node that receives
    "push": ("send", "a", "b", "b"),
    "pull": ("pull", "b", "a", "b"),
    "bidirectional": ("send", "a", "b-bidir", "b"),
}


def _dataset() -> list[bytes]:
    """Patient P1: study 1.1 (4 CT of 39 kB, split at BucketSize 16 KiB, + 3 MR of 10 kB),
    study 1.2 (2 MR); patient P2: one MR."""
    files = [make_instance(patient_id="P1", study_uid="1.1", series_uid="1.1.1", sop_uid=f"1.1.1.{i}",
                           source="CT_small.dcm", InstanceNumber=i) for i in range(4)]
    files += [make_instance(patient_id="P1", study_uid="1.1", series_uid="1.1.2", sop_uid=f"1.1.2.{i}")
              for i in range(3)]
    files += [make_instance(patient_id="P1", study_uid="1.2", series_uid="1.2.1", sop_uid=f"1.2.1.{i}")
              for i in range(2)]
    files += [make_instance(patient_id="P2", study_uid="2.1", series_uid="2.1.1", sop_uid="2.1.1.0")]
    return files


@pytest.fixture(scope="module")
def pair(tmp_path_factory, daemon_storage):
    options = {"Transfers": {"BucketSize": 16, "MaxHttpRetries": 1}}
    with Pair(tmp_path_factory.mktemp("pair"), a=options, b=options, storage=daemon_storage) as pair:
        pair.uploaded = pair.a.upload(_dataset())
        pair.a_md5s = pair.a.md5s()
        yield pair


def _clear(node) -> None:
    for patient in node.http.get("/patients").json():
        assert node.http.delete(f"/patients/{patient}").status_code == 200
    assert node.statistics()["CountInstances"] == 0


def _resources(pair, what: str) -> tuple[list[dict], set[str]]:
    """Resources naming `what`, and the instance IDs they cover."""
    up = pair.uploaded
    if what == "single-instance":
        return [{"Level": "Instance", "ID": up[9]["ID"]}], {up[9]["ID"]}
    if what == "split-instance":
        return [{"Level": "Instance", "ID": up[0]["ID"]}], {up[0]["ID"]}
    if what == "study":
        return [{"Level": "Study", "ID": up[0]["ParentStudy"]}], {u["ID"] for u in up[:7]}
    if what == "patient":  # two studies
        return [{"Level": "Patient", "ID": up[0]["ParentPatient"]}], {u["ID"] for u in up[:9]}
    raise ValueError(what)


@pytest.mark.parametrize("compression", ["gzip", "none"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("what", ["single-instance", "split-instance", "study", "patient"])
def test_transfer_gives_byte_identical_instances(pair, mode, compression, what):
    route, actor, peer, receiver_name = MODES[mode]
    receiver = getattr(pair, receiver_name)
    _clear(receiver)
    resources, expected = _resources(pair, what)
    job = getattr(pair, actor).transfer(route, peer, resources, compression)
    assert job["State"] == "Success", job
    assert job["Type"] == ("PushTransfer" if mode == "push" else "PullTransfer")
    assert job["Content"]["TotalInstances"] == len(expected)
    assert job["Progress"] == 100
    assert receiver.md5s() == {i: pair.a_md5s[i] for i in expected}
    stats = receiver.statistics()
    sizes = {u["ID"]: int(pair.a.http.get(f"/instances/{u['ID']}").json()["FileSize"]) for u in pair.uploaded}
    assert stats["CountInstances"] == len(expected)
    assert int(stats["TotalDiskSize"]) == sum(sizes[i] for i in expected)


def test_like_the_plugin_integration_tests(pair):
    """Orthanc's Run.py: Priority 10 pull, Priority -10 push, Priority 42 bidirectional."""
    resources, _ = _resources(pair, "single-instance")
    _clear(pair.b)
    pulled = pair.b.transfer("pull", "a", resources, Priority=10)
    assert (pulled["Type"], pulled["State"], pulled["Priority"]) == ("PullTransfer", "Success", 10)
    assert pulled["Content"]["CompletedHttpQueries"] == 1 and pulled["Content"]["Peer"] == "a"
    _clear(pair.b)
    pushed = pair.a.transfer("send", "b", resources, Priority=-10)
    assert (pushed["Type"], pushed["State"], pushed["Priority"]) == ("PushTransfer", "Success", -10)
    assert pushed["Content"]["CompletedHttpQueries"] == 1 and pushed["Content"]["TotalInstances"] == 1
    _clear(pair.b)
    created = pair.a.start("send", "b-bidir", resources, Priority=42)
    assert set(created) == {"Peer", "RemoteJob", "URL"} and "//jobs/" in created["URL"]
    remote = pair.b.wait(created["RemoteJob"])
    assert (remote["Type"], remote["State"], remote["Priority"]) == ("PullTransfer", "Success", 0)
    assert remote["Content"]["Peer"] == "a" and remote["Content"]["TotalInstances"] == 1


def test_a_daemon_is_its_own_peer(pair):
    resources, expected = _resources(pair, "study")
    before = pair.a.statistics()
    for route, peer in (("pull", "self"), ("send", "self"), ("send", "self-bidir")):
        job = pair.a.transfer(route, peer, resources)
        assert job["State"] == "Success", (route, peer, job)
        assert job["Content"]["TotalInstances"] == len(expected)
    assert pair.a.statistics() == before  # re-imported, not duplicated
    assert pair.a.md5s() == pair.a_md5s


def test_peers_are_detected(pair):
    assert pair.a.http.get("/transfers/peers").json() == {
        "b": "installed", "b-bidir": "bidirectional", "self": "installed", "self-bidir": "bidirectional"}


def test_pull_can_skip_instances_already_stored(pair):
    resources, expected = _resources(pair, "study")
    _clear(pair.b)
    pair.b.transfer("pull", "a", resources)
    again = pair.b.transfer("pull", "a", resources, SkipStoredInstances=True)
    assert again["State"] == "Success" and again["Content"].get("CompletedHttpQueries", 0) == 0
    plain = pair.b.transfer("pull", "a", resources)
    assert plain["Content"]["CompletedHttpQueries"] > 0  # off by default: counters as the plugin's


def test_errors_of_transfer_creation(pair):
    resources, _ = _resources(pair, "study")
    for route in ("pull", "send"):
        unknown = pair.a.http.post(f"/transfers/{route}", json={"Resources": resources, "Peer": "nope",
                                                                "Compression": "gzip"})
        assert unknown.status_code == 404 and "nope" in unknown.json()["Details"]
        bad = pair.a.http.post(f"/transfers/{route}", json={"Resources": resources, "Peer": "b",
                                                            "Compression": "zip"})
        assert bad.status_code == 400
    missing = pair.b.transfer("pull", "a", [{"Level": "Study", "ID": "ffffffff-ffffffff-ffffffff-ffffffff-ffffffff"}])
    assert missing["State"] == "Failure" and missing["ErrorCode"] == 1
    assert "ffffffff" in missing["ErrorDetails"] and "'a'" in missing["ErrorDetails"]


def _shape(value):
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.parametrize("mode, seq", [("pull", 2), ("push", 4)])
def test_finished_job_json_matches_the_plugin_field_by_field(pair, mode, seq):
    require_samples()
    recorded = exchange("07-jobs", seq).response_json()
    route, actor, peer, receiver = MODES[mode]
    _clear(getattr(pair, receiver))
    ours = getattr(pair, actor).transfer(route, peer, _resources(pair, "patient")[0])
    # Between two of our daemons "gzip" travels as the negotiated codec, which Content names;
    # every other field is the plugin's (a real plugin peer never leads to this field).
    assert ours["Content"].pop("Codec") == "shuffle-zstd"
    assert _shape(ours) == _shape(recorded)


def test_command_line_send_pull_jobs_peers(pair, capsys):
    from accelerator.cli import main

    study = pair.uploaded[0]["ParentStudy"]
    _clear(pair.b)
    assert main(["send", "b", "--study", study, "--wait", "--no-progress", "--url", pair.a.url]) == 0
    out = capsys.readouterr().out
    assert "PushTransfer Success 100%" in " ".join(out.split()) and "7 instance(s)" in out
    _clear(pair.b)
    assert main(["pull", "a", "--study", study, "--compression", "none", "--wait", "--no-progress",
                 "--url", pair.b.url]) == 0
    assert "PullTransfer Success" in " ".join(capsys.readouterr().out.split())
    _clear(pair.b)
    assert main(["send", "b-bidir", "--study", study, "--wait", "--no-progress", "--url", pair.a.url]) == 0
    out = capsys.readouterr().out
    assert "pulls from us as job" in out
    job_id = out.split("pulls from us as job ")[1].split()[0]  # not the first listed: jobs of other tests run too
    assert pair.b.statistics()["CountInstances"] == 7

    assert main(["jobs", "--url", pair.b.url]) == 0
    listing = capsys.readouterr().out
    assert f"{job_id}  PullTransfer Success" in listing
    assert main(["jobs", job_id, "--url", pair.b.url]) == 0 and job_id in capsys.readouterr().out
    with pytest.raises(SystemExit, match="HTTP 400"):
        main(["jobs", job_id, "--resubmit", "--url", pair.b.url])  # a successful job
    assert main(["peers", "--url", pair.a.url]) == 0
    assert "b-bidir" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="name at least one"):
        main(["send", "b", "--url", pair.a.url])
