"""A study moved between the disk and the bucket of a hybrid daemon while another daemon pulls it
from there: every bucket read during the move is whole and right, and the pull ends with
byte-identical instances; then the same the other way back."""

from __future__ import annotations

import pytest

from bench.harness import free_port
from tests.conftest import object_storage_section
from tests.faultproxy import Fault, FaultProxy
from tests.transfers.pair import Pair
from tests.transfers.test_job_control import wait_for_progress
from tests.transfers.test_restart import CHUNKS, OPTIONS, dataset

pytestmark = pytest.mark.slow

STALL = 0.15  # seconds per chunk request: the pull of 40 buckets by 2 workers lasts about 3 s


def slow_chunks(method: str, path: str, attempt: int) -> Fault | None:
    return Fault.stall(STALL) if method == "GET" and path.startswith(CHUNKS) else None


def test_a_study_moves_both_ways_while_it_is_pulled(tmp_path, s3_server):
    port_b = free_port()
    hybrid = object_storage_section(s3_server, hybrid_mode="WriteToFileSystem")
    with FaultProxy(f"http://127.0.0.1:{port_b}", slow_chunks) as proxy, \
            Pair(tmp_path, a=OPTIONS, b={**OPTIONS, **hybrid}, proxy_url=proxy.url, port_b=port_b) as pair:
        uploaded = pair.b.upload(dataset("7.7"))
        study = [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}]
        source = pair.b.md5s()
        for target in ("object-storage", "file-system"):
            for instance in list(pair.a.md5s()):
                assert pair.a.http.delete(f"/instances/{instance}").status_code == 200
            job = pair.a.start("pull", "b-proxy", study, "none")
            wait_for_progress(pair.a, job["ID"], 4)
            moved = pair.b.http.post("/move-storage", json={"Resources": [study[0]["ID"]], "TargetStorage": target},
                                     timeout=60)  # synchronous, as Orthanc's
            assert moved.status_code == 200, moved.text
            assert pair.a.job(job["ID"])["State"] == "Running"  # buckets were read before, during and after
            finished = pair.a.wait(job["ID"])
            assert finished["State"] == "Success", finished
            assert pair.a.md5s() == source  # every instance byte-identical
            for instance in source:
                info = pair.b.http.get(f"/instances/{instance}/attachments/dicom/info").json()
                assert info["Storage"] == [target], info
