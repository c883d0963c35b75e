"""Two real daemons (A and B, each the other's peer, tests/transfers/pair.py) and a folder of DICOM
files, shared by the client scripts of this folder, which drive A as their users drive Orthanc."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from protocol.resources import resource_ids
from tests.dicom_data import make_instance
from tests.transfers.pair import Pair

PATIENT, OTHER_PATIENT = "CLIENT-PAT-1", "CLIENT-PAT-2"
STUDY_UID, OTHER_STUDY_UID = "1.2.826.0.1.3680043.10.1234.71", "1.2.826.0.1.3680043.10.1234.72"


@dataclass
class Site:
    pair: Pair
    folder: Path
    study_id: str  # the study of PATIENT
    other_study_id: str
    md5s: dict[str, str]  # instance ID -> MD5 of its file, for the study of PATIENT
    other_md5s: dict[str, str]

    @property
    def url(self) -> str:
        return self.pair.a.url

    @property
    def url_b(self) -> str:
        return self.pair.b.url


def _files(folder: Path) -> tuple[dict[str, str], dict[str, str], str, str]:
    """Two series of three instances for PATIENT, one instance for OTHER_PATIENT, and a text file."""
    md5s: dict[str, str] = {}
    other: dict[str, str] = {}
    for series in (1, 2):
        for number in (1, 2, 3):
            series_uid = f"{STUDY_UID}.{series}"
            sop = f"{series_uid}.{number}"
            data = make_instance(patient_id=PATIENT, study_uid=STUDY_UID, series_uid=series_uid, sop_uid=sop,
                                 InstanceNumber=number, PatientName="Client^One", StudyDescription="Client study")
            path = folder / f"series{series}" / f"img{number}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            md5s[resource_ids(PATIENT, STUDY_UID, series_uid, sop).instance] = hashlib.md5(data).hexdigest()
    data = make_instance(patient_id=OTHER_PATIENT, study_uid=OTHER_STUDY_UID, series_uid=f"{OTHER_STUDY_UID}.1",
                         sop_uid=f"{OTHER_STUDY_UID}.1.1", PatientName="Client^Two")
    (folder / "other.dcm").write_bytes(data)
    ids = resource_ids(OTHER_PATIENT, OTHER_STUDY_UID, f"{OTHER_STUDY_UID}.1", f"{OTHER_STUDY_UID}.1.1")
    other[ids.instance] = hashlib.md5(data).hexdigest()
    (folder / "README.txt").write_text("not a DICOM file\n")
    study = resource_ids(PATIENT, STUDY_UID, f"{STUDY_UID}.1", f"{STUDY_UID}.1.1").study
    return md5s, other, study, ids.study


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    root = tmp_path_factory.mktemp("clients")
    folder = root / "upload"
    md5s, other, study, other_study = _files(folder)
    with Pair(root) as pair:
        yield Site(pair, folder, study, other_study, md5s, other)


@pytest.fixture
def uploaded(site) -> Site:
    """The folder stored on A (plain POST /instances: what the other scripts start from)."""
    for path in sorted(site.folder.rglob("*.dcm")):
        answer = httpx.post(f"{site.url}/instances", content=path.read_bytes())
        assert answer.status_code == 200, answer.text
    return site

