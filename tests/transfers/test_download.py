"""accelerator.transfers.download: the landed log and the spooled payload writer of a download area."""

from __future__ import annotations

import hashlib

import pytest

from accelerator.transfers import download
from accelerator.transfers.download import DownloadArea, LandedLog
from protocol.chunks import scatter_ranges
from protocol.errors import NetworkProtocol
from protocol.messages import Chunk, InstanceInfo


def test_landed_log_replays_lands_and_refetches_and_ignores_a_torn_line(tmp_path):
    log = LandedLog(tmp_path)
    assert log.read() == (set(), 0)
    try:
        for index in range(5):
            log.landed(index, 100 + index)
        log.again([3, 1])
        log.landed(3, 7)
    finally:
        log.close()
    assert log.read() == ({0, 2, 3, 4}, 100 + 101 + 102 + 103 + 104 + 7)
    with open(log.path, "ab") as f:
        f.write(b"+9 10\n+x 1\n+8 1")  # a damaged line, and a last one cut short by a crash
    assert log.read() == ({0, 2, 3, 4, 9}, 517 + 10)


def _area(tmp_path, sizes: dict[str, int]) -> tuple[DownloadArea, dict[str, bytes]]:
    data = {iid: bytes((i * 7 + n) % 251 for n in range(size)) for i, (iid, size) in enumerate(sizes.items())}
    infos = [InstanceInfo(iid, len(b), hashlib.md5(b).hexdigest()) for iid, b in data.items()]
    return DownloadArea(tmp_path / "area", infos).create(), data


@pytest.mark.parametrize("in_memory", [1 << 20, 5000])  # all kept in memory / spilled to a file
def test_a_spooled_bucket_reaches_the_files_only_once_complete(tmp_path, monkeypatch, in_memory):
    monkeypatch.setattr(download, "SPOOL_IN_MEMORY", in_memory)
    a, b = "0" * 8 + "-1" * 1, "1" * 8 + "-2"
    area, data = _area(tmp_path, {a: 9000, b: 4000})
    bucket = (Chunk(a, 1000, 8000), Chunk(b, 0, 4000))
    payload = data[a][1000:] + data[b]
    writer = area.payload_writer(scatter_ranges(bucket), "none", len(payload))
    for start in range(0, len(payload), 1500):
        writer.feed(payload[start:start + 1500])
    assert (writer.spool.file is not None) == (in_memory < len(payload))
    assert area.path_of(a).read_bytes() == bytes(9000)  # nothing written before the end
    assert writer.finish() == len(payload)
    assert area.path_of(a).read_bytes() == bytes(1000) + data[a][1000:]
    assert area.path_of(b).read_bytes() == data[b]
    assert writer.digests == {b: hashlib.md5(data[b]).hexdigest()}  # whole instances only


def test_a_spooled_bucket_cut_short_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "SPOOL_IN_MEMORY", 1000)
    a = "0" * 8 + "-1"
    area, data = _area(tmp_path, {a: 6000})
    writer = area.payload_writer(scatter_ranges((Chunk(a, 0, 6000),)), "none", 6000)
    writer.feed(data[a][:5000])
    with pytest.raises(NetworkProtocol):
        writer.finish()
    assert area.path_of(a).read_bytes() == bytes(6000)
    assert sorted(p.name for p in area.folder.iterdir()) == [a]  # its spill file is gone
