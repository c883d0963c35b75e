"""Real Orthanc servers for the tests and the benchmarks: Debian's `orthanc` package on loopback.

`start_orthanc(folder)` writes a configuration into `folder` (storage and index under it, HTTP on
a free 127.0.0.1 port, no plugin loaded, no job saved, instances stable after one second), starts
`/usr/sbin/Orthanc` with its log in `folder/orthanc.log`, and returns once `GET /system` answers.
`OrthancServer.stop()` ends it by PID: SIGTERM (Orthanc then closes its index cleanly), then
SIGKILL after a grace period; `restart()` starts it again on the same folder and ports.

These are the "plain Orthanc" ends of replication tests and benchmarks: any version, no transfers
plugin, exactly what a site runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: python bench/orthanc.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.processes import stop_process
from bench.seaweedfs import free_ports

DEBIAN_BINARY = "/usr/sbin/Orthanc"
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL: Orthanc flushes its index on SIGTERM
START_TIMEOUT = 30.0
SYSTEM_CA_CERTIFICATES = "/etc/ssl/certs/ca-certificates.crt"


def orthanc_binary() -> str | None:
    """Debian's Orthanc (package `orthanc`), else an `Orthanc` on PATH; None when neither."""
    if os.access(DEBIAN_BINARY, os.X_OK):
        return DEBIAN_BINARY
    return shutil.which("Orthanc")


@dataclass
class OrthancServer:
    url: str
    auth: tuple[str, str] | None
    folder: Path
    storage_dir: Path
    index_dir: Path
    config_path: Path
    process: subprocess.Popen
    started_in: float = 0.0  # seconds from spawn to a first answer of /system

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def client(self, **kwargs: Any) -> httpx.Client:
        """A synchronous client on this server, with its credentials."""
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """End Orthanc by its PID: SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        stop_process(self.process, STOP_GRACE)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop it if it runs, then start it again on the same configuration (folder, ports)."""
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (Debian package `orthanc`, /usr/sbin/Orthanc)")
        self.stop()
        started = time.monotonic()
        self.process = _spawn(binary, self.config_path, self.folder)
        _wait_ready(self, started + timeout)
        self.started_in = time.monotonic() - started

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def orthanc_config(folder: Path, *, name: str, http_port: int, dicom_port: int, dicom: bool,
                   username: str | None, password: str | None, storage_compression: bool) -> dict[str, Any]:
    """The options of Orthanc 1.10.1 (see /etc/orthanc/orthanc.json) that a test server needs:
    everything under `folder`, nothing from /usr/share/orthanc/plugins, nothing slow."""
    config: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": storage_compression,
        "Plugins": [],  # the packaged plugins (worklists, serve-folders) are not wanted
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "HttpDescribeErrors": True,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": username is not None,
        "DicomServerEnabled": dicom,
        "DicomPort": dicom_port,
        "DicomAet": name.upper()[:16],
        "DicomModalities": {},
        "OrthancPeers": {},
        "WebDavEnabled": False,
        "OrthancExplorerEnabled": False,
        "HttpTimeout": 30,
        "HttpRequestTimeout": 30,
        "SaveJobs": False,  # jobs of a previous run are not replayed at a restart
        "JobsHistorySize": 100,
        "StableAge": 1,
        "SyncStorageArea": False,  # a test server does not need fsync per file
        "ConcurrentJobs": 2,
        "MetricsEnabled": True,
        "CheckRevisions": False,
        "OverwriteInstances": False,
    }
    if Path(SYSTEM_CA_CERTIFICATES).is_file():  # else Orthanc names a file beside the configuration
        config["HttpsCACertificates"] = SYSTEM_CA_CERTIFICATES
    if username is not None:
        config["RegisteredUsers"] = {username: password or ""}
    return config


def start_orthanc(folder: Path, *, name: str = "orthanc", username: str | None = None,
                  password: str | None = None, storage_compression: bool = False, dicom: bool = False,
                  extra: dict[str, Any] | None = None, timeout: float = START_TIMEOUT) -> OrthancServer:
    """Start an Orthanc under `folder`; return once `GET /system` answers 200.

    `username`/`password`: HTTP Basic authentication enforced with that one user. `extra`: more
    options, overriding ours. Raises FileNotFoundError without the binary, RuntimeError or
    TimeoutError (with the log's tail) when it does not come up.
    """
    binary = orthanc_binary()
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (Debian package `orthanc`, /usr/sbin/Orthanc)")
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    config = orthanc_config(folder, name=name, http_port=http_port, dicom_port=dicom_port, dicom=dicom,
                            username=username, password=password, storage_compression=storage_compression)
    config.update(extra or {})
    storage_dir, index_dir = Path(config["StorageDirectory"]), Path(config["IndexDirectory"])
    storage_dir.mkdir(parents=True, exist_ok=True)
    index_dir.mkdir(parents=True, exist_ok=True)
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    url = f"http://127.0.0.1:{config['HttpPort']}"
    auth = (username, password or "") if username is not None else None
    started = time.monotonic()
    server = OrthancServer(url, auth, folder, storage_dir, index_dir, config_path,
                           _spawn(binary, config_path, folder))
    _wait_ready(server, started + timeout)
    server.started_in = time.monotonic() - started
    return server


def _spawn(binary: str, config_path: Path, folder: Path) -> subprocess.Popen:
    """Orthanc on `config_path`; it logs to stderr when given no --logfile, so one file,
    `orthanc.log` (appended to at each start), holds its log and any crash."""
    with open(folder / "orthanc.log", "ab") as log:
        return subprocess.Popen([binary, str(config_path)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=folder)


def _wait_ready(server: OrthancServer, deadline: float) -> None:
    """Until `GET /system` answers 200; on failure the process is stopped and the error carries
    the log's tail."""
    last = "no answer"
    try:
        with httpx.Client(auth=server.auth, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if server.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {server.process.returncode}:\n{server.log_tail()}")
                try:
                    answer = client.get(server.url + "/system")
                    if answer.status_code == 200:
                        return
                    last = f"{answer.status_code} {answer.text[:200]}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise TimeoutError(f"Orthanc at {server.url} not ready: {last}\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":  # manual check: python bench/orthanc.py [FOLDER]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        srv = start_orthanc(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
        print(f"Orthanc at {srv.url} ready in {srv.started_in:.2f} s: {httpx.get(srv.url + '/system').json()}")
        t = time.monotonic()
        srv.stop()
        print(f"stopped in {time.monotonic() - t:.2f} s")
