"""A hub of replicas for the tests: N daemons sharing one PostgreSQL index (`Lock: false`) and
one object-storage bucket, behind HAProxy in round-robin mode with no stickiness at all; and a
sender daemon that knows the hub as peer `hub` (through the balancer)."""

from __future__ import annotations

import os
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.harness import Daemon, free_port
from bench.haproxy import start_haproxy
from tests.conftest import object_storage_section, postgresql_section
from tests.transfers.pair import Node

OPTIONS = {"HttpTimeout": 20, "JobsLease": 3, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 6, "Threads": 3,
                                                             "AdaptiveBucketSize": False}}


class Cluster:
    def __init__(self, tmp_path: Path, postgres: Any, s3: Any, *, replicas: int = 3, sender_url: str | None = None):
        """`sender_url`: how the replicas reach the sender (peer `sender`), e.g. through a proxy."""
        self.tmp_path = tmp_path
        self.sender_port = free_port()
        self.sender_url = sender_url or f"http://127.0.0.1:{self.sender_port}"
        self.shared = {**postgresql_section(postgres, Lock=False), **object_storage_section(s3)}
        self.ports = [free_port() for _ in range(replicas)]
        self._stack = ExitStack()
        self.replicas: list[Daemon | None] = []

    def replica_config(self, number: int) -> dict[str, Any]:
        return {"HttpPort": self.ports[number], "Name": f"replica{number}", **OPTIONS, **self.shared,
                "OrthancPeers": {"sender": {"Url": self.sender_url}}}

    def start_replica(self, number: int) -> Daemon:
        daemon = Daemon(self.replica_config(number), self.tmp_path / f"replica{number}").start()
        self.replicas[number] = daemon
        return daemon

    def kill_replica(self, number: int) -> None:
        """SIGKILL the replica's process group, as a crash would."""
        daemon = self.replicas[number]
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        self.replicas[number] = None

    def __enter__(self) -> Cluster:
        self.replicas = [None] * len(self.ports)
        for number in range(len(self.ports)):
            self.start_replica(number)
        self.balancer = start_haproxy(self.tmp_path / "haproxy", [f"http://127.0.0.1:{p}" for p in self.ports])
        self.hub = Node(_Fixed(self.balancer.url))
        sender = Daemon({"HttpPort": self.sender_port, **OPTIONS, "OrthancPeers": {"hub": {"Url": self.balancer.url}}},
                        self.tmp_path / "sender")
        self.sender = Node(self._stack.enter_context(sender))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self.balancer.stop()
        for daemon in self.replicas:
            if daemon is not None:
                daemon.stop()


class _Fixed:
    """What `Node` needs of a daemon: its URL (here the balancer's)."""

    def __init__(self, url: str):
        self.url = url
