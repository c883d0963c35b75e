"""A real load balancer for the tests and the benchmarks: HAProxy (Debian's `haproxy`) on loopback.

`start_haproxy(folder, backends, mode=...)` writes a configuration into `folder` and starts
`haproxy -db -f <config>` (foreground, so the PID we hold is HAProxy's own) on a free 127.0.0.1
port, in front of the given backend URLs:

- `round-robin`: each request to the next replica, no stickiness at all (`balance roundrobin`,
  `http-reuse never` and `option http-server-close`, so even the requests of one client
  connection go round the replicas: the strictest test of stateless replicas);
- `sender-transfer-id`: requests of one transfer to one replica (`balance hdr(sender-transfer-id)`),
  for deployments that prefer stickiness (what the plugin needs).

`HAProxy.stop()` ends it by PID. `HAProxy.render(...)` gives the configuration text, which the
README shows as the documented configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.processes import stop_process
from bench.seaweedfs import free_ports

MODES = ("round-robin", "sender-transfer-id")
STOP_GRACE = 5.0
START_TIMEOUT = 15.0


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (str(Path("/usr/sbin/haproxy")) if Path("/usr/sbin/haproxy").exists() else None)


def render(port: int, backends: list[str], mode: str = "round-robin", *, bind: str = "127.0.0.1",
           timeout: int = 600) -> str:
    """The HAProxy configuration: one frontend, one backend of replicas, health checks on /system."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    balance = "balance roundrobin" if mode == "round-robin" else "balance hdr(sender-transfer-id)"
    servers = []
    for number, url in enumerate(backends, 1):
        parts = urlsplit(url)
        servers.append(f"    server replica{number} {parts.hostname}:{parts.port} check inter 500ms fall 2 rise 1")
    reuse = ["    http-reuse never", "    option http-server-close"] if mode == "round-robin" else []
    return "\n".join([
        "global",
        "    maxconn 4096",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        f"    timeout client {timeout}s",
        f"    timeout server {timeout}s",
        "    option redispatch",  # a request for a dead replica goes to a live one
        "    retries 3",
        "    retry-on conn-failure",  # never reached a replica: safe to send to another
        f"frontend accelerator",
        f"    bind {bind}:{port}",
        "    default_backend replicas",
        "backend replicas",
        f"    {balance}",
        *reuse,
        "    option httpchk GET /system",
        *servers,
        "",
    ])


@dataclass
class HAProxy:
    url: str
    config_path: Path
    process: subprocess.Popen

    def stop(self) -> None:
        stop_process(self.process, STOP_GRACE)


def start_haproxy(folder: Path, backends: list[str], *, mode: str = "round-robin") -> HAProxy:
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("HAProxy is not installed (Debian package `haproxy`)")
    folder.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    config = folder / "haproxy.cfg"
    config.write_text(render(port, backends, mode))
    log = (folder / "haproxy.log").open("ab")
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    log.close()
    server = HAProxy(f"http://127.0.0.1:{port}", config, process)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"HAProxy exited ({process.returncode}): {(folder / 'haproxy.log').read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/system", timeout=1).status_code < 500:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"HAProxy did not answer within {START_TIMEOUT} s")
        time.sleep(0.1)
