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
