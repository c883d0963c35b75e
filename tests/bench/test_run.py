"""The transfer benchmark (python -m bench): its quick mode end to end, and its checks.

The end-to-end test is what CI runs so that the benchmark cannot rot: as root it covers
loopback and the 100mbit-20ms emulated link, otherwise loopback only (the bench says why).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.datasets import ensure_study
from bench.harness import REPO_ROOT
from bench.link import unavailable_reason
from bench.run import default_instances, parse_args
from bench.systems import SYSTEMS, dcmtk_config, verify_received_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench's plots need matplotlib")
    results_dir = tmp_path / "results"
    args = [sys.executable, "-m", "bench", "--quick", "--runs", "1", "--results-dir", str(results_dir),
            "--workdir", str(tmp_path)]
    systems = list(SYSTEMS)
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        systems.remove("dcmtk-cstore")
        args += ["--systems", ",".join(systems)]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    expected_profiles = ["loopback"] if unavailable_reason() else ["loopback", "100mbit-20ms"]
    if unavailable_reason():
        assert unavailable_reason() in proc.stdout
    results = json.loads((results_dir / "results.json").read_text())
    assert list(results["profiles"]) == expected_profiles
    summary = {(e["profile"], e["system"]): e for e in results["summary"]}
    assert set(summary) == {(p, s) for p in expected_profiles for s in systems}
    for (profile, system), e in summary.items():
        assert e["ok_runs"] == e["runs"] == 1, (profile, system, e["errors"])
        assert e["metrics"]["goodput_mb_s"]["median"] > 0
    for r in results["runs"]:
        dataset = results["datasets"][r["dataset"]]
        assert r["ok"] and r["verified_bytes"] == dataset["bytes"], (r["system"], r.get("error"))
        assert r["progress"] and r["progress"][-1][1] == pytest.approx(1.0)
        if r["profile"] != "loopback":
            assert r["metrics"]["wire_mb"] > 0 and 0 < r["metrics"]["of_limit"] < 1.05
            assert r["metrics"]["forwarder_cpu_s"] is not None
        if r["system"].endswith("-gzip"):
            assert r["metrics"]["compression_ratio"] > 1.2     # the CT study compresses ~1.65x
        assert r["metrics"]["receiver_peak_rss_mib"] > 0 and r["metrics"]["sender_cpu_s"] is not None

    for name in ("goodput.png", "progress.png"):
        data = (results_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    table = (results_dir / "results.md").read_text()
    for system in systems:
        assert f"| {system} |" in table
    assert table.strip().splitlines()[-1] in proc.stdout     # the table is printed too


def test_default_sizes_fit_the_links():
    assert default_instances("ct", "loopback", quick=False) == 300
    assert default_instances("ct", "20mbit-50ms-0.5loss", quick=False) == 300
    assert default_instances("ct", "10mbit-100ms-1loss", quick=False) == 170
    assert default_instances("large", "100mbit-20ms", quick=False) == 3
    assert default_instances("large", "10mbit-100ms-1loss", quick=False) == 1
    assert default_instances("ct", "100mbit-20ms", quick=True) == 40
    a = parse_args(["--profiles", "loopback", "20mbit-50ms-0.5loss", "--datasets", "ct,jpeg"])
    assert a.profiles == ["loopback", "20mbit-50ms-0.5loss"] and a.datasets == ["ct", "jpeg"]
    assert a.systems == list(SYSTEMS) and a.runs == 3
    with pytest.raises(SystemExit):
        parse_args(["--systems", "ftp"])


def test_derive_limit_and_ratio():
    run = {"system": "accel-pull-gzip", "wall_s": 10.0, "verified_bytes": 30_000_000,
           "sender": "daemon-a", "receiver": "daemon-b",
           "usage": {"daemon-a": {"cpu_s": 1.0, "peak_rss_bytes": 100 * 2**20},
                     "daemon-b": {"cpu_s": 2.0, "peak_rss_bytes": 50 * 2**20}},
           "link_stats": {"forwarder_cpu_s": 0.5,
                          "a_to_b": {"rx_bytes": 21_000_000, "bytes": 20_520_000, "packets": 10_000,
                                     "dropped_loss_bytes": 480_000, "dropped_queue_bytes": 0},
                          "b_to_a": {"rx_bytes": 300_000}}}
    m = report.derive(run, 30_000_000, 20e6)
    assert m["goodput_mb_s"] == pytest.approx(3.0)
    assert m["compression_ratio"] == pytest.approx(30_000_000 / 20_000_000)
    assert m["limit_mb_s"] == pytest.approx(2.5 * 1.5)
    assert m["of_limit"] == pytest.approx(3.0 / 3.75)
    assert m["link_use"] == pytest.approx(20_520_000 * 8 / (20e6 * 10))
    assert m["wire_mb"] == pytest.approx(21.3)
    assert m["sender_peak_rss_mib"] == pytest.approx(100) and m["receiver_cpu_s"] == 2.0
    none = report.derive({**run, "system": "accel-pull-none"}, 30_000_000, 20e6)
    assert none["compression_ratio"] == 1.0 and none["limit_mb_s"] == pytest.approx(2.5)


def test_received_files_are_checked(tmp_path):
    """The C-STORE check accepts re-encoded but equal data sets and catches a changed one."""
    import pydicom
    manifest = ensure_study("ct", tmp_path / "study", instances=3, matrix=32)
    received = tmp_path / "received"
    received.mkdir()
    for i, path in enumerate(manifest.paths()):
        ds = pydicom.dcmread(path)
        ds.file_meta.ImplementationVersionName = "OTHER"      # another writer's meta header
        if i == 1:                                           # same values, other encoding
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if i == 2:
            ds.PatientName = "Changed^Name"
        ds.save_as(received / f"CT.{ds.SOPInstanceUID}", enforce_file_format=True)
    good, problems, identical = verify_received_files(manifest, received)
    assert good == manifest.files[0].size + manifest.files[1].size
    assert identical == 1
    assert len(problems) == 1 and "differs" in problems[0]
    os.unlink(next(received.glob("*")))
    _, problems, _ = verify_received_files(manifest, received)
    assert any("never arrived" in p for p in problems)

    cfg = tmp_path / "storescu.cfg"
    assert dcmtk_config(manifest, cfg) == "Bench"
    text = cfg.read_text()
    assert f"{manifest.files[0].SOPClassUID}\\TS0" in text and manifest.files[0].TransferSyntaxUID in text


def test_bench_module_help():
    r = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and "--quick" in r.stdout
    assert Path(REPO_ROOT / "bench" / "__main__.py").exists()
