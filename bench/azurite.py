"""A real Azure Blob service for the tests and the benchmarks: Azurite (npm `azurite`) on loopback.

`./run test` installs it into `.azurite/` (`npm install --prefix .azurite azurite@3`); nothing is
installed here. `start_azure_server(folder)` starts `azurite-blob` (the blob service only) on a free
127.0.0.1 port with its data under `folder`, telemetry off, and returns once a container can be
created. `AzureServer.stop()` ends it by PID: SIGTERM, then SIGKILL after a grace period.

Azurite knows one account, the emulator's well-known `devstoreaccount1` and its published key, and
serves it path-style (`http://127.0.0.1:PORT/devstoreaccount1/<container>/<blob>`). Containers are
made with a plain SharedKey-signed `PUT /<account>/<container>?restype=container` (obstore does not
create containers).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Callable, NamedTuple

import httpx

if __package__ in (None, ""):  # run as a script: python bench/azurite.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.processes import stop_process
from bench.seaweedfs import free_ports

#: The emulator's account and key, published by Microsoft (not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-08-06"
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
PREFIX = Path(__file__).resolve().parent.parent / ".azurite"  # where `./run test` installs it


def azurite_binary() -> str | None:
    """`azurite-blob` of the project's npm prefix (`.azurite/`), else on PATH; None without node."""
    if shutil.which("node") is None:
        return None
    local = PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("azurite-blob")


def connection_string(endpoint: str, account_key: str = ACCOUNT_KEY, account: str = ACCOUNT) -> str:
    """An Azure connection string for the emulator at `endpoint` (`http://host:port/account`)."""
    return (f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={account_key};"
            f"BlobEndpoint={endpoint};")


def signed_request(method: str, endpoint: str, path: str, query: dict[str, str] | None = None,
                   account: str = ACCOUNT, account_key: str = ACCOUNT_KEY, body: bytes = b"",
                   timeout: float = 10.0) -> httpx.Response:
    """One SharedKey-signed Blob request; `endpoint` is path-style (`http://host:port/account`)
    and `path` is below it (`/container`)."""
    query = query or {}
    url_path = "/" + endpoint.split("://", 1)[1].split("/", 1)[1].strip("/") + path  # /account/container
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": API_VERSION}
    length = str(len(body)) if body else ""
    canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers))
    resource = f"/{account}{url_path}" + "".join(f"\n{k.lower()}:{query[k]}" for k in sorted(query))
    to_sign = "\n".join([method, "", "", length, "", "", "", "", "", "", "", ""]) + "\n" + canonical_headers + resource
    signature = base64.b64encode(hmac.new(base64.b64decode(account_key), to_sign.encode(), hashlib.sha256).digest())
    headers["Authorization"] = f"SharedKey {account}:{signature.decode()}"
    return httpx.request(method, endpoint.rstrip("/") + path, params=query, headers=headers, content=body,
                         timeout=timeout)


class AzureEndpoint(NamedTuple):
    """What the `azure_server` fixture yields."""

    endpoint: str  # the blob endpoint, path-style: http://127.0.0.1:PORT/devstoreaccount1
    account_name: str
    account_key: str
    connection_string: str
    create_container: Callable[[], str]  # a fresh, empty container per call


@dataclass
class AzureServer:
    endpoint: str
    process: subprocess.Popen
    folder: Path
    started_in: float  # seconds from spawn to a created container
    account_name: str = ACCOUNT
    account_key: str = ACCOUNT_KEY
    _names: itertools.count = field(default_factory=itertools.count)

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint, self.account_key, self.account_name)

    def create_container(self, name: str | None = None) -> str:
        """A new, empty container (a fresh name unless one is given)."""
        name = name or f"test-{next(self._names)}-{secrets.token_hex(4)}"
        answer = signed_request("PUT", self.endpoint, f"/{name}", {"restype": "container"},
                                self.account_name, self.account_key)
        if answer.status_code != 201:
            raise RuntimeError(f"Azurite: cannot create container {name}: {answer.status_code} {answer.text[:300]}")
        return name

    def stop(self) -> None:
        """End the server by its PID: SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        stop_process(self.process, STOP_GRACE)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.folder / "azurite.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_azure_server(folder: Path, *, timeout: float = 30.0) -> AzureServer:
    """Start Azurite's blob service with its data under `folder`; return once a container can be
    created (FileNotFoundError when Azurite or node is not installed)."""
    binary = azurite_binary()
    if binary is None:
        raise FileNotFoundError("Azurite is not installed (npm install --prefix .azurite azurite@3, "
                                "which `./run test` does when npm is there)")
    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    command = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
               "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    started = time.monotonic()
    with open(folder / "azurite.log", "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=folder)
    server = AzureServer(f"http://127.0.0.1:{port}/{ACCOUNT}", process, folder, 0.0)
    try:
        _wait_ready(server, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.started_in = time.monotonic() - started
    return server


def _wait_ready(server: AzureServer, deadline: float) -> None:
    """Until a probe container can be created (the account's key accepted)."""
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Azurite exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            answer = signed_request("PUT", server.endpoint, "/readiness-probe", {"restype": "container"},
                                    server.account_name, server.account_key, timeout=2)
            if answer.status_code in (201, 409):  # 409: made by an earlier probe whose answer was lost
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"Azurite at {server.endpoint} not ready: {last}\n{server.log_tail()}")


if __name__ == "__main__":  # manual check: python bench/azurite.py [FOLDER]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        srv = start_azure_server(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
        print(f"Azurite at {srv.endpoint} ready in {srv.started_in:.2f} s; container {srv.create_container()}")
        t = time.monotonic()
        srv.stop()
        print(f"stopped in {time.monotonic() - t:.2f} s")
