"""`accelerator find`: POST /tools/find from the command line, against a real daemon."""

from __future__ import annotations

import httpx
import pytest

from accelerator.cli import main
from bench.harness import Daemon
from protocol.resources import orthanc_id
from tests.dicom_data import make_instance

pytestmark = pytest.mark.slow

HEAD = ("FIND-1", "1.2.79.1", "20240105", "ACC-1", "Head CT", "DOE^JOHN")
KNEE = ("FIND-2", "1.2.79.2", "20231120", "ACC-2", "Knee MR", "ROE^JANE")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with Daemon({}, tmp_path_factory.mktemp("find")) as daemon:
        for patient, study, date, accession, description, name in (HEAD, KNEE):
            for i in range(2):
                data = make_instance(patient_id=patient, study_uid=study, series_uid=f"{study}.1",
                                     sop_uid=f"{study}.1.{i}", StudyDate=date, AccessionNumber=accession,
                                     StudyDescription=description, PatientName=name, Modality="MR")
                assert httpx.post(f"{daemon.url}/instances", content=data).status_code == 200
        yield daemon.url


def _find(capsys, url, *args) -> tuple[int, list[str], str]:
    code = main(["find", *args, "--url", url])
    captured = capsys.readouterr()
    return code, [line for line in captured.out.splitlines() if line.strip()], captured.err


def test_find_a_study_by_patient_id_prints_its_id_and_a_summary(url, capsys):
    code, lines, err = _find(capsys, url, "--patient-id", "FIND-1")
    assert code == 0 and len(lines) == 1, lines
    study = orthanc_id("FIND-1", "1.2.79.1")
    assert lines[0].startswith(study)
    for text in ("FIND-1", "DOE^JOHN", "20240105", "ACC-1", "Head CT", "2 instance(s)"):
        assert text in lines[0]
    assert "1 study" in err


@pytest.mark.parametrize("args, expected", [
    (("--patient-name", "ROE*"), ["FIND-2"]),
    (("--study-date", "20240101-"), ["FIND-1"]),
    (("--study-date", "20230101-20231231"), ["FIND-2"]),
    (("--accession", "ACC-2"), ["FIND-2"]),
    (("--description", "*CT"), ["FIND-1"]),
    (("--patient-id", "FIND-?"), ["FIND-1", "FIND-2"]),
    ((), ["FIND-1", "FIND-2"]),
])
def test_find_by_tags(url, capsys, args, expected):
    code, lines, _ = _find(capsys, url, *args)
    assert code == 0
    assert sorted(line.split()[1] for line in lines) == expected


def test_nothing_found_exits_1(url, capsys):
    code, lines, err = _find(capsys, url, "--patient-id", "NOBODY")
    assert (code, lines) == (1, []) and "0 studies" in err


def test_other_levels(url, capsys):
    code, lines, _ = _find(capsys, url, "--level", "series", "--patient-id", "FIND-2")
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith(orthanc_id("FIND-2", "1.2.79.2", "1.2.79.2.1")) and "MR" in lines[0]
    code, lines, _ = _find(capsys, url, "--level", "patient", "--patient-name", "DOE*")
    assert code == 0 and lines[0].startswith(orthanc_id("FIND-1")) and "1 study(ies)" in lines[0]
    code, lines, _ = _find(capsys, url, "--level", "instance", "--patient-id", "FIND-1")
    assert code == 0 and len(lines) == 2


def test_limit_says_there_may_be_more(url, capsys):
    code, lines, err = _find(capsys, url, "--limit", "1")
    assert code == 0 and len(lines) == 1 and "raise --limit" in err


def test_description_of_a_patient_is_refused(url):
    with pytest.raises(SystemExit, match="--description searches studies or series"):
        main(["find", "--level", "patient", "--description", "x", "--url", url])
