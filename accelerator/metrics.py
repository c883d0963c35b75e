"""The daemon's metrics, for `GET /tools/metrics-prometheus` (Prometheus text format).

Three families of names:

- the Transfers plugin's own (1.7, NEWS and the Orthanc Book's metrics table), kept exactly, as
  the plugin publishes them (values set through Orthanc, no `_total` suffix), for dashboards
  built on the plugin:
  `orthanc_transfers_{created,committed,aborted,available}_push_count`,
  `orthanc_transfers_push_total_received_bytes_count`,
  `orthanc_transfers_push_total_time_spent_in_{reception,commit}_ms`. The plugin's cache metrics
  (`orthanc_transfers_used_cache_size`, `..._cache_{hit,miss}_count`) are not published: we have
  no such cache (a source reads byte ranges from the storage directly);
- Orthanc's core names where they are cheap (`orthanc_count_instances`, `orthanc_jobs_running`,
  `orthanc_last_change`, ...), computed when scraped (`Snapshot`). These two families are printed
  as Orthanc prints its registry (`name value timestamp-ms`, sorted by name, no HELP/TYPE);
- ours, `accelerator_*`, for a user watching transfers: bytes moved and buckets done per kind of
  transfer, buckets in flight, HTTP retries per peer, jobs by type and state.

Counters live in one process-wide registry; the transfer code adds to them with one-line hooks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # Orthanc answers "text/plain; version=0.0.4"
MEGA_BYTES = 1024 * 1024

#: Kinds of transfer in the `transfer` label.
PUSH, PULL, RECEIVER, PEER_STORE = "push", "pull", "push-receiver", "peer-store"

REGISTRY = CollectorRegistry(auto_describe=True)
STARTED = time.time()  # for orthanc_up_time_s: this process's start

BYTES = Counter("accelerator_transfer_bytes", "Bytes of bucket or instance bodies moved over the network "
                "(as on the wire, compressed when they were)", ["direction", "transfer"], registry=REGISTRY)
BUCKETS = Counter("accelerator_transfer_buckets", "Bucket (or instance) requests completed",
                  ["transfer"], registry=REGISTRY)
IN_FLIGHT = Gauge("accelerator_transfer_buckets_in_flight", "Bucket (or instance) requests under way",
                  ["transfer"], registry=REGISTRY)
RETRIES = Counter("accelerator_peer_http_retries", "Requests to a peer attempted again (transport error, "
                  "5xx or 429)", ["peer"], registry=REGISTRY)


class _PluginCounters:
    """The Transfers plugin's push counters (receiver side), published under its names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.created = self.committed = self.aborted = 0
        self.received_bytes = 0
        self.reception_ms = 0.0
        self.commit_ms = 0.0
        self._receiving: dict[tuple[str, int], float] = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def reception_started(self, tx_id: str, index: int) -> None:
        with self._lock:
            self._receiving[(tx_id, index)] = time.monotonic()

    def reception_ended(self, tx_id: str, index: int) -> None:
        with self._lock:
            started = self._receiving.pop((tx_id, index), None)
            if started is not None:
                self.reception_ms += (time.monotonic() - started) * 1000


PLUGIN = _PluginCounters()


# -- hooks (one line each in the transfer code) -----------------------------------------------

def push_created() -> None:
    PLUGIN.add("created")


def push_committed(seconds: float) -> None:
    PLUGIN.add("committed")
    PLUGIN.add("commit_ms", seconds * 1000)


def push_aborted(count: int = 1) -> None:
    PLUGIN.add("aborted", count)


def push_bucket_received(wire_bytes: int) -> None:
    PLUGIN.add("received_bytes", wire_bytes)
    bucket_done(RECEIVER, wire_bytes, "received")


def bucket_done(transfer: str, wire_bytes: int, direction: str | None = None) -> None:
    """One bucket (or instance) request of `transfer` completed, `wire_bytes` moved."""
    direction = direction or ("received" if transfer == PULL else "sent")
    BYTES.labels(direction, transfer).inc(wire_bytes)
    BUCKETS.labels(transfer).inc()


class in_flight:  # noqa: N801 (used like a function: `with metrics.in_flight(PULL):`)
    """Counts a request of `transfer` as in flight while in the block (`with` or `async with`)."""

    def __init__(self, transfer: str):
        self.gauge = IN_FLIGHT.labels(transfer)

    def __enter__(self) -> None:
        self.gauge.inc()

    def __exit__(self, *exc: object) -> None:
        self.gauge.dec()

    async def __aenter__(self) -> None:
        self.gauge.inc()

    async def __aexit__(self, *exc: object) -> None:
        self.gauge.dec()


def retried(peer: str) -> None:
    RETRIES.labels(peer).inc()


# -- scrape -----------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What is read when scraped: the index's statistics, the jobs, the receiver, the log."""

    statistics: dict[str, int]
    jobs: list[tuple[str, str]]  # (type, state) of every job the engine knows
    max_push_transactions: int
    active_push_transactions: int
    last_change: int
    started: float  # time.time() when the daemon started
    job_types: tuple[str, ...] = field(default_factory=tuple)


_STATES = ("Pending", "Running", "Paused", "Success", "Failure")


def _orthanc_values(s: Snapshot) -> dict[str, float]:
    """Orthanc's core metrics and the Transfers plugin's, by name."""
    stats = s.statistics
    counts = {state: 0 for state in _STATES}
    for _, state in s.jobs:
        counts[state] = counts.get(state, 0) + 1
    with PLUGIN._lock:
        p = PLUGIN
        plugin = {
            "orthanc_transfers_created_push_count": p.created,
            "orthanc_transfers_committed_push_count": p.committed,
            "orthanc_transfers_aborted_push_count": p.aborted,
            "orthanc_transfers_push_total_received_bytes_count": p.received_bytes,
            "orthanc_transfers_push_total_time_spent_in_reception_ms": int(p.reception_ms),
            "orthanc_transfers_push_total_time_spent_in_commit_ms": int(p.commit_ms),
        }
    return {
        "orthanc_count_patients": stats["patients"],
        "orthanc_count_studies": stats["studies"],
        "orthanc_count_series": stats["series"],
        "orthanc_count_instances": stats["instances"],
        "orthanc_disk_size_mb": stats["disk_size"] / MEGA_BYTES,
        "orthanc_uncompressed_size_mb": stats["uncompressed_size"] / MEGA_BYTES,
        "orthanc_up_time_s": int(time.time() - s.started),
        "orthanc_last_change": s.last_change,
        "orthanc_jobs_pending": counts["Pending"],
        "orthanc_jobs_running": counts["Running"],
        "orthanc_jobs_success": counts["Success"],
        "orthanc_jobs_failed": counts["Failure"],
        "orthanc_jobs_completed": counts["Success"] + counts["Failure"],
        "orthanc_transfers_available_push_count": max(0, s.max_push_transactions - s.active_push_transactions),
        **plugin,
    }


def _number(value: float) -> str:
    """As Orthanc prints them: integers without a decimal point, others with 9 digits."""
    return str(int(value)) if float(value).is_integer() else format(value, ".9g")


class _JobsCollector:
    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        jobs = GaugeMetricFamily("accelerator_jobs", "Jobs by type and state", labels=["type", "state"])
        by_kind: dict[tuple[str, str], int] = {(t, state): 0 for t in s.job_types for state in _STATES}
        for kind in s.jobs:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        for (job_type, state), count in sorted(by_kind.items()):
            jobs.add_metric([job_type, state], count)
        yield jobs


def render(snapshot: Snapshot) -> bytes:
    """The whole text answer. Orthanc's and the plugin's metrics first, exactly as Orthanc prints
    them (`name value timestamp-ms`, sorted, no HELP/TYPE lines: clients such as
    orthanc-api-client read only lines of three fields), then ours with their HELP and TYPE."""
    now = int(time.time() * 1000)
    values = _orthanc_values(snapshot)
    orthanc = "".join(f"{name} {_number(values[name])} {now}\n" for name in sorted(values))
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(_JobsCollector(snapshot))
    return orthanc.encode() + generate_latest(scraped) + generate_latest(REGISTRY)
