"""Two real daemons on loopback, each the other's peer, for end-to-end transfer tests.

A knows B as `b` (push when sending) and `b-bidir` (RemoteSelf `a`: B pulls from A when A
sends); B knows A as `a`. With `proxy`, A reaches B through a fault-injecting proxy (peer
`b-proxy`), so tests can drop, stall, truncate or corrupt chosen requests.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.harness import Daemon, free_port

FINISHED = ("Success", "Failure")


class Node:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.url = daemon.url
        self.http = httpx.Client(base_url=daemon.url, timeout=60)

    def upload(self, files: list[bytes]) -> list[dict]:
        answers = [self.http.post("/instances", content=data) for data in files]
        assert all(a.status_code == 200 for a in answers)
        return [a.json() for a in answers]

    def statistics(self) -> dict:
        return self.http.get("/statistics").json()

    def md5s(self) -> dict[str, str]:
        """Every stored instance's ID -> MD5 of its downloaded bytes."""
        return {i: hashlib.md5(self.http.get(f"/instances/{i}/file").content).hexdigest()
                for i in self.http.get("/instances").json()}

    def start(self, route: str, peer: str, resources: list[dict], compression: str = "gzip", **extra) -> dict:
        answer = self.http.post(f"/transfers/{route}", json={"Resources": resources, "Peer": peer,
                                                          "Compression": compression, **extra})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 60, states=FINISHED) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["State"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['State']} after {timeout} s: {job}")
            time.sleep(0.05)

    def transfer(self, route: str, peer: str, resources: list[dict], compression: str = "gzip", **extra) -> dict:
        """Start a transfer and wait for its job (local, or remote for a bidirectional send)."""
        created = self.start(route, peer, resources, compression, **extra)
        if "RemoteJob" in created:
            deadline = time.monotonic() + 60
            while (job := httpx.get(created["URL"]).json())["State"] not in FINISHED:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return job
        return self.wait(created["ID"])

    def close(self) -> None:
        self.http.close()


class Pair:
    def __init__(self, tmp_path: Path, *, a: dict | None = None, b: dict | None = None,
                 proxy_url: str | None = None, port_a: int | None = None, port_b: int | None = None,
                 storage: Callable[[], dict] = dict):
        """`storage()` gives the options that choose a daemon's storage (the `storage_section`
        fixtures): called once per daemon, so that a restarted daemon finds its bucket again."""
        self.tmp_path = tmp_path
        self.port_a, self.port_b = port_a or free_port(), port_b or free_port()
        self.options_a, self.options_b = {**storage(), **(a or {})}, {**storage(), **(b or {})}
        self.proxy_url = proxy_url
        self._stack = ExitStack()

    def config_a(self) -> dict[str, Any]:
        url_b = f"http://127.0.0.1:{self.port_b}/"
        peers = {"b": {"Url": url_b}, "b-bidir": {"Url": url_b, "RemoteSelf": "a"}, "self": {"Url": f"http://127.0.0.1:{self.port_a}/"},
                 "self-bidir": {"Url": f"http://127.0.0.1:{self.port_a}/", "RemoteSelf": "self"}}
        if self.proxy_url:
            peers["b-proxy"] = {"Url": self.proxy_url}
        return {"HttpPort": self.port_a, "OrthancPeers": peers, **self.options_a}

    def config_b(self) -> dict[str, Any]:
        return {"HttpPort": self.port_b, "OrthancPeers": {"a": {"Url": f"http://127.0.0.1:{self.port_a}/"}},
                **self.options_b}

    def start_a(self) -> Node:
        self.a = Node(self._stack.enter_context(Daemon(self.config_a(), self.tmp_path / "a")))
        return self.a

    def start_b(self) -> Node:
        self.b = Node(self._stack.enter_context(Daemon(self.config_b(), self.tmp_path / "b")))
        return self.b

    def __enter__(self) -> "Pair":
        self.start_a()
        self.start_b()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
