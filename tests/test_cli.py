"""The command line, for real: `accelerator serve` as a process on loopback, `import` against it."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from accelerator import __version__
from accelerator.cli import main
from accelerator.store import schema
from accelerator.store.index import INDEX_FILE
from bench.harness import Daemon, DaemonError
from tests.dicom_data import bundled_files, make_instance

pytestmark = pytest.mark.slow


@contextmanager
def daemon(tmp_path: Path, *args: str, **options):
    with Daemon(options, tmp_path / "daemon", args=args) as running:
        yield running.url


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"accelerator {__version__}"


def test_import_walks_folders_skips_non_dicom_and_counts(tmp_path, capsys):
    folder = tmp_path / "incoming" / "nested"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"img{i}.dcm").write_bytes(make_instance(sop_uid=f"1.2.9.{i}"))
    (folder / "README.txt").write_text("not a DICOM file")
    (tmp_path / "incoming" / "dup.dcm").write_bytes(make_instance(sop_uid="1.2.9.0"))
    single = tmp_path / "single.dcm"
    single.write_bytes(make_instance(sop_uid="1.2.9.99"))
    with daemon(tmp_path) as url:
        code = main(["import", str(tmp_path / "incoming"), str(single), str(tmp_path / "missing.dcm"),
                     "--url", url, "--no-progress"])
        out = capsys.readouterr().out
        stats = httpx.get(f"{url}/statistics").json()
    assert "imported: 6, already stored: 1, not DICOM: 1, failed: 1" in out
    assert "missing.dcm: no such file" in out
    assert code == 1  # a missing path is a failure
    assert stats["CountInstances"] == 6


def test_import_of_the_bundled_files_with_authentication(tmp_path, capsys):
    files = bundled_files()[:40]
    with daemon(tmp_path, AuthenticationEnabled=True, RegisteredUsers={"alice": "secret"}) as url:
        denied = main(["import", *map(str, files[:1]), "--url", url, "--no-progress"])
        assert denied == 1 and "HTTP 401" in capsys.readouterr().out
        code = main(["import", *map(str, files), "--url", url, "--no-progress",
                     "--username", "alice", "--password", "secret"])
        out = capsys.readouterr().out
        count = httpx.get(f"{url}/statistics", auth=("alice", "secret")).json()["CountInstances"]
    assert code == 0 and "failed: 0" in out
    imported = int(out.split("imported: ")[1].split(",")[0])
    assert imported == count > 0


def test_bad_configuration_stops_with_a_message(tmp_path):
    with pytest.raises(DaemonError, match="exited with code 2") as error:
        Daemon({"Transfers": {"BucketSize": 0}}, tmp_path).start()
    assert "Transfers.BucketSize: expected an integer >= 1, got 0" in str(error.value)


def test_old_index_is_refused_then_upgraded(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    conn = sqlite3.connect(storage / INDEX_FILE)
    schema.create(conn, 1)
    conn.close()
    with pytest.raises(DaemonError, match="exited with code 2") as error:
        Daemon({"StorageDirectory": str(storage)}, tmp_path / "refused").start()
    assert "accelerator serve --upgrade" in str(error.value)

    with daemon(tmp_path, "--upgrade", StorageDirectory=str(storage)) as url:
        assert httpx.get(f"{url}/system").json()["DatabaseVersion"] == schema.SCHEMA_VERSION
    conn = sqlite3.connect(storage / INDEX_FILE)
    assert schema.version_of(conn) == schema.SCHEMA_VERSION
    conn.close()


# -- import: studies printed, skipped files named, ZIP archives --------------------------------

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_import_prints_the_studies_and_names_what_it_skipped(tmp_path, capsys):
    import io
    import zipfile

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"a{i}.dcm").write_bytes(make_instance(patient_id="IMP-1", study_uid="1.2.77.1",
                                                         series_uid="1.2.77.1.1", sop_uid=f"1.2.77.1.1.{i}",
                                                         StudyDescription="Imported head", StudyDate="20240105"))
    (folder / "notes.txt").write_text("hello")
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as inner:
        inner.writestr("x.dcm", b"whatever")
    archive = _zip(tmp_path / "batch.zip", {
        "dicom/b0.dcm": make_instance(patient_id="IMP-2", study_uid="1.2.77.2", series_uid="1.2.77.2.1",
                                      sop_uid="1.2.77.2.1.0"),
        "dicom/readme.txt": b"not DICOM",
        "../escape.dcm": make_instance(sop_uid="1.2.77.9"),
        "inner.zip": nested.getvalue(),
        "folder/": b"",
    })
    with daemon(tmp_path) as url:
        code = main(["import", str(folder), str(archive), "--url", url, "--no-progress"])
        out = capsys.readouterr().out
        stats = httpx.get(f"{url}/statistics").json()
        study = httpx.post(f"{url}/tools/lookup", content=b"1.2.77.1").json()[0]["ID"]
    assert code == 0, out
    assert "imported: 4, already stored: 0, not DICOM: 2, failed: 0" in out
    assert "2 studies:" in out
    line = next(line for line in out.splitlines() if study in line)
    assert "PatientID IMP-1" in line and "20240105" in line and "Imported head" in line
    assert "3 instance(s) (3 from this import)" in line
    assert "notes.txt: not DICOM" in out and "batch.zip:dicom/readme.txt: not DICOM" in out
    assert "batch.zip:../escape.dcm: unsafe name" in out
    assert "batch.zip:inner.zip: nested ZIP" in out
    assert stats["CountInstances"] == 4  # nothing from the unsafe member or the nested archive


def test_zip_members_that_lie_about_their_kind_are_skipped(tmp_path):
    """A nested archive under a .dcm name is found by its content."""
    import io
    import zipfile

    from accelerator.importer import ImportSummary, unsafe_member_name, zip_items

    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as inner:
        inner.writestr("x.dcm", b"x")
    archive = _zip(tmp_path / "a.zip", {"disguised.dcm": nested.getvalue(), "ok.dcm": b"DICM"})
    summary = ImportSummary()
    items = {item.name.rsplit(":", 1)[1]: item for item in zip_items(archive, summary)}
    assert set(items) == {"disguised.dcm", "ok.dcm"} and not summary.skipped
    with pytest.raises(Exception):  # noqa: B017  (the importer names it "nested ZIP archive")
        items["disguised.dcm"].read()
    assert items["ok.dcm"].read() == b"DICM"
    for name in ("/etc/passwd", "a/../../b", "C:\\x", "..\\x"):
        assert unsafe_member_name(name), name
    assert not unsafe_member_name("a/b..c/d.dcm")


# -- send / pull: identifiers resolved, unknown ones refused before a job exists ----------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.transfers.pair import Pair

    with Pair(tmp_path_factory.mktemp("cli-pair")) as running:
        files = [make_instance(patient_id="CLI-PAT", study_uid="1.2.78.1", series_uid="1.2.78.1.1",
                               sop_uid=f"1.2.78.1.1.{i}") for i in range(3)]
        running.a.upload(files)
        running.b.upload([make_instance(patient_id="REMOTE-PAT", study_uid="1.2.78.5", series_uid="1.2.78.5.1",
                                        sop_uid="1.2.78.5.1.1")])
        yield running


def _jobs(url: str) -> list:
    return httpx.get(f"{url}/jobs").json()


def _orthanc_study(patient: str, study: str) -> str:
    from protocol.resources import orthanc_id

    return orthanc_id(patient, study)


@pytest.mark.parametrize("value", ["1.2.78.1", "CLI-PAT", "orthanc-id"])
def test_send_takes_a_study_uid_a_patient_id_or_an_orthanc_id(pair, capsys, value):
    study = _orthanc_study("CLI-PAT", "1.2.78.1")
    value = study if value == "orthanc-id" else value
    code = main(["send", "b", "--study", value, "--wait", "--no-progress", "--url", pair.a.url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Success" in out
    if value == "CLI-PAT":
        assert "study CLI-PAT: patient " in out  # a PatientID given to --study: the whole patient
    assert httpx.get(f"{pair.b.url}/studies/{study}").status_code == 200


@pytest.mark.parametrize("route, value", [("send", "hello"), ("send", "0" * 8 + "-00000000" * 4),
                                          ("pull", "hello")])
def test_unknown_resources_are_refused_before_a_job_exists(pair, capsys, route, value):
    before = _jobs(pair.a.url)
    with pytest.raises(SystemExit) as refused:
        main([route, "b", "--study", value, "--url", pair.a.url])
    message = str(refused.value.code)
    assert repr(value) in message or value in message
    assert _jobs(pair.a.url) == before


def test_a_series_uid_given_to_study_is_refused_with_the_right_option(pair):
    with pytest.raises(SystemExit, match="is a series .* use --series"):
        main(["send", "b", "--study", "1.2.78.1.1", "--url", pair.a.url])


def test_pull_by_study_uid_through_the_daemon(pair, capsys):
    """Resolved on the peer with POST /transfers/remote/{peer}/lookup (the peer's credentials)."""
    study = _orthanc_study("REMOTE-PAT", "1.2.78.5")
    code = main(["pull", "b", "--study", "1.2.78.5", "--wait", "--no-progress", "--url", pair.a.url])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "not checked before the job" not in captured.err
    assert httpx.get(f"{pair.a.url}/studies/{study}").status_code == 200
    with pytest.raises(SystemExit):  # unknown on the peer: refused before any job exists
        main(["pull", "b", "--study", "1.2.78.999", "--url", pair.a.url])


def test_send_wait_follows_the_job_of_a_peer_that_pulls_from_us(pair, capsys):
    study = _orthanc_study("CLI-PAT", "1.2.78.1")
    code = main(["send", "b-bidir", "--study", study, "--wait", "--no-progress", "--url", pair.a.url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pulls from us as job" in out and "PullTransfer" in out and "Success" in out


def test_peers_lists_every_peer_with_its_state(pair, capsys):
    assert main(["peers", "--url", pair.a.url]) == 0
    out = capsys.readouterr().out
    states = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert states == {"b": "installed", "b-bidir": "bidirectional", "self": "installed",
                      "self-bidir": "bidirectional"}


def test_every_option_has_a_help_text():
    from accelerator.cli import _parser

    def walk(parser):
        for action in parser._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield from ((f"{name} {a}", h) for a, h in walk(sub))
            elif action.option_strings or action.dest not in ("help",):
                yield "/".join(action.option_strings) or action.dest, action.help

    missing = [name for name, text in walk(_parser()) if not text and not name.startswith("storage")]
    assert missing == []


# -- why a peer is disabled (accelerator.peers.probe_with_reason) ------------------------------

def _probe_config(tmp_path: Path):
    from accelerator.config import config_from_dict

    peers = {name: {"Url": f"http://{name}.invalid:8042/"}
             for name in ("ok", "bidir", "refused", "denied", "plain", "broken", "moved")}
    peers["bidir"]["RemoteSelf"] = "me"
    return config_from_dict({"StorageDirectory": str(tmp_path), "OrthancPeers": peers})


def test_probe_with_reason_says_why_a_peer_is_disabled(tmp_path):
    import anyio

    from accelerator.peers import Peers, detect_with_reasons, probe_with_reason

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host.split(".")[0]
        if host == "refused":
            raise httpx.ConnectError("Connection refused", request=request)
        return {
            "ok": httpx.Response(200, json=["transfers"]),
            "bidir": httpx.Response(200, json=["transfers", "dicom-web"]),
            "denied": httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'}),
            "plain": httpx.Response(200, json=["dicom-web"]),
            "broken": httpx.Response(200, content=b"<html>"),
            "moved": httpx.Response(302, headers={"Location": "https://elsewhere.invalid/"}),
        }[host]

    async def run():
        async with Peers(_probe_config(tmp_path), transport_factory=lambda peer: httpx.MockTransport(handler)) as peers:
            return ({name: await probe_with_reason(peers, name) for name in peers.names()},
                    await detect_with_reasons(peers))

    reasons, detected = anyio.run(run)
    assert reasons["ok"] == ("installed", "") and reasons["bidir"] == ("bidirectional", "")
    assert reasons["refused"][0] == "disabled" and reasons["refused"][1].startswith("unreachable: could not connect")
    assert reasons["denied"] == ("disabled", "credentials refused (HTTP 401): check Username and Password "
                                             "of peer 'denied' in OrthancPeers")
    assert reasons["plain"] == ("disabled", "no transfers plugin (plugins: dicom-web)")
    assert reasons["broken"][1].startswith("GET /plugins did not answer JSON")
    assert "redirect to https://elsewhere.invalid/" in reasons["moved"][1]
    assert detected["denied"] == {"State": "disabled", "Reason": reasons["denied"][1]}
    assert {name: entry["State"] for name, entry in detected.items()} == {n: r[0] for n, r in reasons.items()}


def test_remote_job_and_lookup_use_the_peers_credentials(tmp_path):
    """The functions behind GET /transfers/remote/{peer}/jobs/{id} and POST .../lookup."""
    import anyio

    from accelerator.config import config_from_dict
    from accelerator.peers import Peers, remote_job, remote_lookup
    from protocol.errors import UnknownResource

    study = "0" * 8 + "-11111111" * 4
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers.get("authorization")))
        if request.url.path == "/jobs/abc-123":
            return httpx.Response(200, json={"ID": "abc-123", "State": "Running"})
        if request.url.path == "/tools/lookup":
            found = request.content == b"1.2.3"
            return httpx.Response(200, json=[{"ID": study, "Path": f"/studies/{study}", "Type": "Study"}]
                                  if found else [])
        if request.url.path == f"/studies/{study}":
            return httpx.Response(200, json={"ID": study})
        return httpx.Response(404, json={"HttpStatus": 404})

    config = config_from_dict({"StorageDirectory": str(tmp_path), "OrthancPeers": {
        "p": {"Url": "http://p.invalid/", "Username": "u", "Password": "pw"}}})

    async def run():
        async with Peers(config, transport_factory=lambda peer: httpx.MockTransport(handler)) as peers:
            job = await remote_job(peers, "p", "abc-123")
            with pytest.raises(UnknownResource):
                await remote_job(peers, "p", "../system")
            return job, await remote_lookup(peers, "p", "1.2.3"), await remote_lookup(peers, "p", study), \
                await remote_lookup(peers, "p", "nothing")

    job, by_uid, by_id, nothing = anyio.run(run)
    assert job["State"] == "Running"
    assert by_uid == [{"ID": study, "Path": f"/studies/{study}", "Type": "Study"}]
    assert {"ID": study, "Path": f"/studies/{study}", "Type": "Study"} in by_id
    assert nothing == []
    assert all(auth and auth.startswith("Basic ") for _, _, auth in seen)
