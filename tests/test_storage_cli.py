"""`accelerator storage stat|ls|verify|move` against real daemons (`accelerator serve` processes on
loopback), on the file system and in HybridMode with a real S3 server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from accelerator.cli import main
from accelerator.commands import Daemon as Client
from accelerator.storage_commands import all_ids
from bench.harness import Daemon
from tests.conftest import object_storage_section
from tests.dicom_data import make_instance

pytestmark = pytest.mark.slow

STUDIES = ("1.2.826.0.1.3680043.10.1234.1.1", "1.2.826.0.1.3680043.10.1234.1.2")


def upload(url: str, per_study: int = 2) -> dict[str, list[str]]:
    """`per_study` instances in each of two studies; returns study ID -> instance IDs."""
    studies: dict[str, list[str]] = {}
    for s, study_uid in enumerate(STUDIES):
        for i in range(per_study):
            data = make_instance(study_uid=study_uid, series_uid=f"{study_uid}.{s}",
                                 sop_uid=f"{study_uid}.{s}.{i + 1}")
            answer = httpx.post(f"{url}/instances", content=data)
            assert answer.status_code == 200, answer.text
            studies.setdefault(answer.json()["ParentStudy"], []).append(answer.json()["ID"])
    return studies


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["storage", *args])
    return code, capsys.readouterr().out


def ls_lines(capsys, url: str, *filters: str) -> dict[str, list[str]]:
    code, out = run(capsys, "ls", "--url", url, *filters)
    assert code == 0, out
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_ls_verify_and_stat_on_the_file_system(tmp_path, capsys):
    with Daemon({}, tmp_path / "daemon") as daemon:
        url = daemon.url
        studies = upload(url)
        every = [i for ids in studies.values() for i in ids]

        listed = ls_lines(capsys, url)
        assert sorted(listed) == sorted(every)
        for instance, (size, md5, sides) in listed.items():
            info = httpx.get(f"{url}/instances/{instance}/attachments/dicom/info").json()
            assert (int(size), md5, sides) == (info["UncompressedSize"], info["UncompressedMD5"], "file-system")
        first_study, second_study = studies
        assert sorted(ls_lines(capsys, url, "--study", first_study)) == sorted(studies[first_study])
        code, out = run(capsys, "ls", "--url", url, "--instance", every[-1], "--study", second_study)
        assert sorted(line.split()[0] for line in out.splitlines()) == sorted(studies[second_study])  # once each

        code, out = run(capsys, "verify", "--url", url, "--no-progress")
        assert code == 0 and f"verified {len(every)} instance(s): {len(every)} ok, 0 failed" in out

        victim = studies[second_study][0]
        uuid = httpx.get(f"{url}/instances/{victim}/attachments/dicom/info").json()["Uuid"]
        flip_a_byte(tmp_path / "daemon" / "storage" / uuid[0:2] / uuid[2:4] / uuid)
        code, out = run(capsys, "verify", "--url", url, "--no-progress")
        assert code == 1
        assert f"{len(every) - 1} ok, 1 failed" in out
        assert f"FAILED {victim}: the stored bytes do not match the MD5 of the index" in out
        code, out = run(capsys, "verify", "--url", url, "--study", first_study)  # with a progress bar
        assert code == 0 and "2 ok, 0 failed" in out
        code, out = run(capsys, "verify", "--url", url, "--instance", victim, "--no-progress")
        assert code == 1 and f"FAILED {victim}" in out

        code, out = run(capsys, "stat", "--url", url)
        assert code == 0
        assert "writes to:       file-system\n" in out
        assert f"file-system:     {(tmp_path / 'daemon' / 'storage').resolve()}  {len(every)} attachment(s)" in out
        assert f"index:           {len(every)} instance(s)" in out
        code, out = run(capsys, "stat", "--url", url, "--no-count")
        assert code == 0 and "attachment(s)" not in out

        assert list(all_ids(Client(url), "instances", page=3)) == \
            httpx.get(f"{url}/instances").json()  # paging: 3 + 1


def test_bad_requests_say_why(tmp_path, capsys):
    with Daemon({}, tmp_path / "daemon") as daemon:
        upload(daemon.url, per_study=1)
        with pytest.raises(SystemExit, match="HTTP 404"):
            main(["storage", "ls", "--url", daemon.url, "--instance", "nope"])
        with pytest.raises(SystemExit, match="name at least one"):
            main(["storage", "move", "--to", "object-storage", "--url", daemon.url])
        with pytest.raises(SystemExit, match="HybridMode only"):  # the plugin's route needs HybridMode
            main(["storage", "move", "--to", "object-storage", "--all", "--url", daemon.url])
        with pytest.raises(SystemExit) as exit_info:
            main(["storage", "move", "--to", "tape", "--all", "--url", daemon.url])
        assert exit_info.value.code == 2  # argparse: not a storage
    with pytest.raises(SystemExit, match="cannot reach"):
        main(["storage", "stat", "--url", daemon.url])


def test_hybrid_ls_stat_and_move(tmp_path, capsys, s3_server):
    section = object_storage_section(s3_server, hybrid_mode="WriteToFileSystem")
    with Daemon(section, tmp_path / "daemon") as daemon:
        url = daemon.url
        studies = upload(url)
        every = [i for ids in studies.values() for i in ids]
        assert {sides for _, _, sides in ls_lines(capsys, url).values()} == {"file-system"}
        code, out = run(capsys, "stat", "--url", url)
        assert code == 0 and "(HybridMode WriteToFileSystem)" in out
        assert f"file-system:     {(tmp_path / 'daemon' / 'storage').resolve()}  {len(every)} attachment(s)" in out
        bucket = section["AwsS3Storage"]["BucketName"]
        assert f"object-storage:  AWS S3 storage, bucket {bucket!r} at {section['AwsS3Storage']['Endpoint']}" in out
        assert "flat layout  0 attachment(s)" in out
        assert section["AwsS3Storage"]["SecretKey"] not in out

        if httpx.get(f"{url}/move-storage").status_code == 404:  # 405 (POST only) once it exists
            pytest.skip("the daemon has no POST /move-storage yet (another part of issue 9)")
        first_study, _ = studies
        code, out = run(capsys, "move", "--to", "object-storage", "--study", first_study, "--wait",
                        "--no-progress", "--url", url)
        assert code == 0, out
        assert "MoveStorage  Success  100%  to object-storage  2 of 2 instance(s) moved" in out
        listed = ls_lines(capsys, url)
        assert {i for i, (_, _, sides) in listed.items() if sides == "object-storage"} == set(studies[first_study])
        assert {i for i, (_, _, sides) in listed.items() if sides == "file-system"} == \
            set(every) - set(studies[first_study])
        code, out = run(capsys, "verify", "--url", url, "--no-progress")
        assert code == 0 and f"{len(every)} ok, 0 failed" in out
        code, out = run(capsys, "stat", "--url", url)
        assert out.count("  2 attachment(s)") == 2

        code, out = run(capsys, "move", "--to", "file-system", "--all", "--wait", "--no-progress", "--url", url)
        assert code == 0, out
        assert {sides for _, _, sides in ls_lines(capsys, url).values()} == {"file-system"}


def test_move_posts_the_plugins_body_and_follows_the_job(capsys, monkeypatch):
    """The client side of `move`, whatever the state of the daemon's route: the body of the
    object-storage plugin's POST /move-storage, then the job followed to its end."""
    from accelerator.cli import _parser
    from accelerator.storage_commands import move

    posted, polls = [], iter(["Pending", "Running", "Success"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/move-storage":
            posted.append(httpx.Response(200, content=request.content).json())
            return httpx.Response(200, json={"ID": "job-1", "Path": "/jobs/job-1"})
        if request.url.path == "/jobs/job-1":
            state = next(polls)
            return httpx.Response(200, json={"ID": "job-1", "Type": "MoveStorage", "State": state,
                                             "Progress": 100 if state == "Success" else 50,
                                             "Content": {"TargetStorage": "object-storage"}})
        return httpx.Response(404, json={"HttpStatus": 404, "Message": "Unknown resource"})

    args = _parser().parse_args(["storage", "move", "--to", "object-storage", "--study", "s1", "--series", "x1",
                                 "--priority", "3", "--wait", "--no-progress"])
    client = Client("http://127.0.0.1:1", transport=httpx.MockTransport(handler))
    monkeypatch.setattr("accelerator.commands.time.sleep", lambda _: None)  # the job's polls
    assert move(client, args) == 0
    assert posted == [{"Resources": ["s1", "x1"], "TargetStorage": "object-storage", "Asynchronous": True,
                       "Priority": 3}]
    out = capsys.readouterr().out
    assert "job job-1" in out and "job-1  MoveStorage  Success  100%  to object-storage" in out

    missing = Client("http://127.0.0.1:1", transport=httpx.MockTransport(
        lambda r: httpx.Response(404, json={"HttpStatus": 404, "Message": "Unknown resource"})))
    with pytest.raises(SystemExit, match="no POST /move-storage"):
        move(missing, args)
