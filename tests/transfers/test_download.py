"""accelerator.transfers.download: the landed log of a download area."""

from __future__ import annotations

from accelerator.transfers.download import LandedLog


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
