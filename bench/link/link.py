"""An emulated slow link between two "hosts" on this machine, for benchmarks.

Our kernel has no netem, so the link is built from parts that it does have:

    namespace A                         root namespace                        namespace B
    198.18.0.1  emu0 (TUN) <==fd==> forwarder (bench/link/forwarder.c) <==fd==> emu0 (TUN)  198.18.0.2

Two network namespaces, one per host, each with ``lo`` up and one TUN device (layer 3, MTU
1500, IPv4 only) whose only route is a /32 to the other host. The forwarder, a small C program
running in the root namespace, holds both TUN file descriptors and applies, independently in
each direction:

- ``loss``: each packet is dropped with that probability (deterministic PRNG seeded by ``seed``);
- a drop-tail queue of ``queue_bytes`` (bytes waiting to be serialized);
- ``rate_bps``: serialization at that rate, counting the IP packet (headers included, no
  link-layer overhead);
- a one-way delay of ``rtt_ms / 2``: a profile's ms figure is the **round-trip time as ping
  measures it** on an idle link, so each direction gets half of it.

Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544) and exist only inside our
namespaces; nothing is routed to or from the root namespace or any outside network. Namespaces
are named ``acclink-<pid>-<n>-a|b`` and are always removed: by ``close()`` / the ``with`` block,
by an ``atexit`` hook, and, for a process that died without either (SIGKILL), by the next
``EmulatedLink`` started on this machine. The forwarder exits when the process that started it
does (it watches a pipe from it), and takes its TUN devices along.

    with EmulatedLink("20mbit-50ms-0.5loss", seed=1) as link:
        server = link.popen("b", ["iperf3", "-s", "-B", link.addr_b])
        link.run("a", ["iperf3", "-c", link.addr_b, "-t", "5"])
        print(link.stats(), link.info())

Everything here needs root (namespaces, TUN devices, sysctls): ``unavailable_reason()`` says
why the link cannot be used, or returns None. Only the standard library is used, so
``python3 -m bench.link.validate`` runs with any Python 3.11.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NOT_ROOT_MESSAGE",
    "PROFILES",
    "EmulatedLink",
    "LinkError",
    "LinkProfile",
    "build_forwarder",
    "cleanup_stale",
    "forwarder_version",
    "have_root",
    "unavailable_reason",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "forwarder.c"
BUILD_DIR = HERE / ".build"          # ignored by git (bench/link/.gitignore)
NS_PREFIX = "acclink"
IFNAME = "emu0"
MTU = 1500
MIN_QUEUE_BYTES = 64 * 1024
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-(\d+)-[ab]$")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_TIMEOUT = 10.0                      # any single `ip`/`sysctl` command

NOT_ROOT_MESSAGE = ("the emulated link needs root (network namespaces, TUN devices, sysctls); "
                    "not root here, so only the loopback profile can run")


class LinkError(RuntimeError):
    """The emulated link could not be set up or used; the message says why."""


@dataclass(frozen=True)
class LinkProfile:
    """One link, symmetric in both directions.

    rate_bps: serialization rate in bit/s of IP packets, per direction (0: unlimited).
    rtt_ms: round-trip time as ping sees it on an idle link; each direction delays rtt_ms / 2.
    loss: probability that a packet is dropped, applied independently in each direction.
    queue_bytes: drop-tail queue per direction; None = one bandwidth-delay product
        (rate * rtt), at least 64 kB.
    congestion: TCP congestion control set as default in both namespaces ("cubic", "bbr",
        "reno"...); None keeps the kernel's default (which is then recorded by ``info()``).
    """

    rate_bps: float
    rtt_ms: float
    loss: float = 0.0
    queue_bytes: int | None = None
    congestion: str | None = None

    def __post_init__(self) -> None:
        if self.rate_bps < 0 or self.rtt_ms < 0 or not 0 <= self.loss <= 1:
            raise ValueError(f"bad link profile {self!r}")
        if self.queue_bytes is not None and self.queue_bytes < MTU:
            raise ValueError(f"queue_bytes {self.queue_bytes} is smaller than one packet ({MTU})")

    @property
    def one_way_delay_ms(self) -> float:
        return self.rtt_ms / 2

    @property
    def effective_queue_bytes(self) -> int:
        if self.queue_bytes is not None:
            return int(self.queue_bytes)
        return max(MIN_QUEUE_BYTES, int(self.rate_bps / 8 * self.rtt_ms / 1000))

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "one_way_delay_ms": self.one_way_delay_ms,
                "effective_queue_bytes": self.effective_queue_bytes}


PROFILES: dict[str, LinkProfile] = {
    "100mbit-20ms": LinkProfile(rate_bps=100e6, rtt_ms=20, loss=0.0),
    "20mbit-50ms-0.5loss": LinkProfile(rate_bps=20e6, rtt_ms=50, loss=0.005, congestion="cubic"),
    "10mbit-100ms-1loss": LinkProfile(rate_bps=10e6, rtt_ms=100, loss=0.01),
}


def have_root() -> bool:
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why an EmulatedLink cannot be made here, or None when it can."""
    if not have_root():
        return NOT_ROOT_MESSAGE
    for tool in ("ip", os.environ.get("CC", "cc")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: {'iproute2' if tool == 'ip' else 'gcc'})"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support in this kernel or container)"
    return None


# ------------------------------------------------------------------------------------ building

def _source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


_lock = threading.Lock()


def build_forwarder() -> Path:
    """The forwarder binary for the current forwarder.c, compiled with ``cc -O2`` when missing.

    Binaries are named after the source's SHA-256, so an edited source is rebuilt on next use.
    """
    digest = _source_digest()[:16]
    with _lock:
        for build_dir in (BUILD_DIR, Path(tempfile.gettempdir()) / "accelerator-link-build"):
            out = build_dir / f"forwarder-{digest}"
            if out.exists():
                return out
            try:
                build_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if not os.access(build_dir, os.W_OK):
                continue
            cc = os.environ.get("CC", "cc")
            tmp = build_dir / f".forwarder-{digest}.{os.getpid()}.tmp"
            try:
                r = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
                                   capture_output=True, text=True, timeout=120)
            except FileNotFoundError:
                raise LinkError(f"no C compiler `{cc}` (Debian: apt-get install gcc)") from None
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise LinkError(f"building {SOURCE} failed:\n{r.stderr[-4000:]}")
            os.replace(tmp, out)
            for old in build_dir.glob("forwarder-*"):   # binaries of older sources
                if old != out:
                    old.unlink(missing_ok=True)
            return out
    raise LinkError(f"no writable directory to build the forwarder in ({BUILD_DIR})")


def forwarder_version() -> str:
    r = subprocess.run([str(build_forwarder()), "--version"], capture_output=True, text=True,
                       timeout=_TIMEOUT)
    return r.stdout.strip()


# ------------------------------------------------------------------------------------ helpers

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise LinkError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def _ns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _ns_pids(name: str) -> list[int]:
    r = _ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _delete_ns(name: str) -> None:
    """Kills whatever still runs in the namespace, then deletes it."""
    if not _ns_exists(name):
        return
    for pid in _ns_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while _ns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    _ip("netns", "delete", name, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Deletes namespaces left by EmulatedLinks of processes that no longer exist."""
    removed = []
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return removed
    for name in names:
        m = _NS_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _delete_ns(name)
            removed.append(name)
    return removed


def _lock_path() -> str:
    return "/run/lock/accelerator-link.lock" if os.path.isdir("/run/lock") else \
        os.path.join(tempfile.gettempdir(), "accelerator-link.lock")


def _proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process, from /proc/PID/stat (in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def _add_cpu(data: dict, cpu: tuple[float, float] | None) -> dict:
    if cpu is None:   # the process is gone: its own getrusage() figure
        data["forwarder_cpu_s"] = data.get("cpu_s")
        data["forwarder_cpu_user_s"] = data["forwarder_cpu_system_s"] = None
    else:
        data["forwarder_cpu_s"] = cpu[0] + cpu[1]
        data["forwarder_cpu_user_s"], data["forwarder_cpu_system_s"] = cpu
    return data


def _read_sysctl(ns: str, key: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/sys/" + key.replace(".", "/")],
                       capture_output=True, text=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LinkError(f"reading {key} in {ns}: {r.stderr.strip()}")
    return r.stdout.strip()


def _write_sysctl(ns: str | None, key: str, value: str) -> str | None:
    """Writes a sysctl inside namespace ``ns`` (None: the root namespace); returns an error or None."""
    path = "/proc/sys/" + key.replace(".", "/")
    if ns is None:
        try:
            Path(path).write_text(value)
            return None
        except OSError as e:
            return e.strerror or str(e)
    r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", 'printf "%s\\n" "$1" > "$2"', "sh",
                        value, path], capture_output=True, text=True, timeout=_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


_live: set[EmulatedLink] = set()
_live_lock = threading.Lock()
_counter = 0


@atexit.register
def _close_all() -> None:
    with _live_lock:
        links = list(_live)
    for link in links:
        try:
            link.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------ the link

class EmulatedLink:
    """Two namespaces ("a" and "b") joined by the forwarder. ``with EmulatedLink(p) as link:``.

    ``profile``: a LinkProfile or the name of one in PROFILES. ``seed``: the loss PRNG's seed
    (each direction has its own stream). ``slack_us``: the forwarder writes a packet up to this
    much before it is due when it is awake anyway, which saves CPU; it never changes the rate.
    """

    def __init__(self, profile: LinkProfile | str, seed: int = 1, *, addr_a: str = "198.18.0.1",
                 addr_b: str = "198.18.0.2", slack_us: float = 200.0):
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise KeyError(f"unknown link profile {profile!r}; known: {', '.join(PROFILES)}")
            self.profile_name: str | None = profile
            profile = PROFILES[profile]
        else:
            self.profile_name = None
        self.profile = profile
        self.seed = int(seed)
        self.addr_a, self.addr_b = addr_a, addr_b
        for addr in (addr_a, addr_b):
            parts = [int(x) for x in addr.split(".")]
            if len(parts) != 4 or parts[0] != 198 or parts[1] not in (18, 19):
                raise ValueError(f"{addr} is not in the benchmarking range 198.18.0.0/15")
        self.slack_us = slack_us
        global _counter
        with _live_lock:
            _counter += 1
            n = _counter
        self.ns_a = f"{NS_PREFIX}-{os.getpid()}-{n}-a"
        self.ns_b = f"{NS_PREFIX}-{os.getpid()}-{n}-b"
        self._fwd: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._procs: list[subprocess.Popen] = []
        self._seq = 0
        self._stats_lock = threading.Lock()
        self._last_stats: dict | None = None
        self._info: dict | None = None
        self._closed = False
        self._started = False

    # -- lifecycle

    def __enter__(self) -> EmulatedLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> EmulatedLink:
        if self._started:
            raise LinkError("link already started")
        reason = unavailable_reason()
        if reason:
            raise LinkError(reason)
        binary = build_forwarder()
        cleanup_stale()
        self._started = True
        with _live_lock:
            _live.add(self)
        try:
            self._setup(binary)
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self, binary: Path) -> None:
        p = self.profile
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.ns_a[:-2]}-"))
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        spec = f"{p.rate_bps:.0f},{p.one_way_delay_ms * 1000:.3f},{p.effective_queue_bytes},{p.loss!r}"
        self._stats_path = self._workdir / "stats.json"
        self._err_path = self._workdir / "forwarder.err"
        with open(self._err_path, "wb") as err:
            self._fwd = subprocess.Popen(
                [str(binary), "--ns-a", f"/run/netns/{self.ns_a}", "--ns-b", f"/run/netns/{self.ns_b}",
                 "--if-a", IFNAME, "--if-b", IFNAME, "--a2b", spec, "--b2a", spec,
                 "--seed", str(self.seed), "--stats", str(self._stats_path),
                 "--slack-us", str(self.slack_us), "--watch-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        line = self._read_ready(timeout=_TIMEOUT)
        if not line.startswith("ready "):
            raise LinkError(f"forwarder did not start: {line!r} {self._err_path.read_text()[-2000:]}")

        # Congestion control first: the kernel default is inherited from the root namespace.
        kernel_default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
        allowed_touched = False
        if p.congestion:
            available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
            if p.congestion not in available:
                raise LinkError(f"congestion control {p.congestion!r} is not available in this kernel "
                                f"(available: {' '.join(available)})")
            allowed_touched = self._set_congestion(p.congestion)

        for ns, local, peer in ((self.ns_a, self.addr_a, self.addr_b), (self.ns_b, self.addr_b, self.addr_a)):
            for key, value in (("net.ipv6.conf." + IFNAME + ".disable_ipv6", "1"),
                               ("net.ipv4.tcp_no_metrics_save", "1")):
                error = _write_sysctl(ns, key, value)
                if error:
                    raise LinkError(f"sysctl {key}={value} in {ns}: {error}")
            _ip("-n", ns, "link", "set", IFNAME, "mtu", str(MTU), "multicast", "off")
            self._offloads_off(ns)
            _ip("-n", ns, "addr", "add", local, "peer", f"{peer}/32", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")

        congestion = {"a": _read_sysctl(self.ns_a, "net.ipv4.tcp_congestion_control"),
                      "b": _read_sysctl(self.ns_b, "net.ipv4.tcp_congestion_control")}
        if p.congestion and set(congestion.values()) != {p.congestion}:
            raise LinkError(f"congestion control {p.congestion!r} requested, namespaces have {congestion}")
        offloads = self._offloads()
        uname = platform.uname()
        self._info = {
            "profile_name": self.profile_name,
            "profile": p.describe(),
            "seed": self.seed,
            "namespaces": {"a": self.ns_a, "b": self.ns_b},
            "addresses": {"a": self.addr_a, "b": self.addr_b},
            "interface": IFNAME, "mtu": MTU,
            "congestion": {**congestion, "requested": p.congestion, "kernel_default": kernel_default,
                           "root_allowed_list_touched": allowed_touched},
            "sysctls": {"net.ipv4.tcp_no_metrics_save": "1",
                        f"net.ipv6.conf.{IFNAME}.disable_ipv6": "1"},
            "offloads": offloads,
            "kernel": f"{uname.system} {uname.release} {uname.version}",
            "forwarder": {"version": forwarder_version(), "source_sha256": _source_digest(),
                          "binary": str(binary), "pid": self._fwd.pid, "slack_us": self.slack_us},
        }

    def _read_ready(self, timeout: float) -> str:
        assert self._fwd is not None and self._fwd.stdout is not None
        fd = self._fwd.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 256)
            if not chunk:
                break
            buf += chunk
        return buf.decode("utf-8", "replace").strip()

    def _set_congestion(self, name: str) -> bool:
        """Sets the default TCP congestion control of both namespaces; True if the root
        namespace's allowed list had to be widened for a moment.

        The setting is per namespace, but a non-root namespace may only pick an algorithm from
        net.ipv4.tcp_allowed_congestion_control (a global list; "reno bbr" here). When the one
        we want is not on it, it is added, both namespaces are set, and the list is put back at
        once: sockets of a namespace use its default whether or not it is on the list.
        """
        errors = {ns: _write_sysctl(ns, "net.ipv4.tcp_congestion_control", name) for ns in (self.ns_a, self.ns_b)}
        if not any(errors.values()):
            return False
        allowed_path = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        # Links made at the same time (threads or processes) take turns, so that none of them
        # "restores" a list another one has widened.
        with _lock, open(_lock_path(), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            original = allowed_path.read_text().strip()
            if name in original.split():
                raise LinkError(f"cannot set tcp_congestion_control={name}: {errors}")
            try:
                error = _write_sysctl(None, "net.ipv4.tcp_allowed_congestion_control", f"{original} {name}")
                if error:
                    raise LinkError(f"cannot allow congestion control {name}: {error}")
                for ns in (self.ns_a, self.ns_b):
                    error = _write_sysctl(ns, "net.ipv4.tcp_congestion_control", name)
                    if error:
                        raise LinkError(f"cannot set tcp_congestion_control={name} in {ns}: {error}")
            finally:
                _write_sysctl(None, "net.ipv4.tcp_allowed_congestion_control", original)
        return True

    def _offloads_off(self, ns: str) -> None:
        """No segmentation or receive offload on the TUN device, so that every packet that
        crosses the forwarder is at most one MTU and pays its own serialization time. (A TUN
        device without IFF_VNET_HDR already gets segmented packets: the forwarder's
        ``max_packet`` counter shows it; this is belt and braces.)"""
        if shutil.which("ethtool") is None:
            return
        for feature in ("tso", "gso", "gro"):
            subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", IFNAME, feature, "off"],
                           capture_output=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)

    def _offloads(self) -> dict[str, str]:
        """Segmentation offloads of the TUN device (all "off": packets never exceed the MTU)."""
        out: dict[str, str] = {}
        if shutil.which("ethtool") is None:
            return out
        r = subprocess.run(["ip", "netns", "exec", self.ns_a, "ethtool", "-k", IFNAME],
                           capture_output=True, text=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)
        for line in r.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("tcp-segmentation-offload", "generic-segmentation-offload",
                               "generic-receive-offload", "scatter-gather"):
                out[key.strip()] = value.split()[0] if value.split() else ""
        return out

    def close(self) -> None:
        """Stops every process started in the namespaces and the forwarder, deletes the
        namespaces. Idempotent; also called at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        try:
            for proc in self._procs:
                _stop_process(proc, timeout=3.0)
            if self._fwd is not None:
                cpu = None
                if self._fwd.poll() is None:
                    try:
                        cpu = _proc_cpu_seconds(self._fwd.pid)
                    except OSError:
                        pass
                    self._fwd.send_signal(signal.SIGTERM)   # it writes its final counters
                    try:
                        self._fwd.wait(5)
                    except subprocess.TimeoutExpired:
                        self._fwd.kill()
                        self._fwd.wait()
                final = self._load_stats()
                if final is not None:
                    self._last_stats = _add_cpu(final, cpu)
                for pipe in (self._fwd.stdin, self._fwd.stdout):
                    if pipe is not None:
                        pipe.close()
        finally:
            for ns in (self.ns_a, self.ns_b):
                _delete_ns(ns)
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    # -- running things in the namespaces

    def ns(self, side: str) -> str:
        if side in ("a", "A"):
            return self.ns_a
        if side in ("b", "B"):
            return self.ns_b
        raise ValueError(f"side must be 'a' or 'b', not {side!r}")

    def addr(self, side: str) -> str:
        return self.addr_a if self.ns(side) == self.ns_a else self.addr_b

    def argv(self, side: str, argv: list[str] | tuple[str, ...]) -> list[str]:
        """The command line that runs ``argv`` inside a namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.ns(side), *map(str, argv)]

    def _check_open(self) -> None:
        if not self._started or self._closed:
            raise LinkError("the link is not running")

    def popen(self, side: str, argv: list[str] | tuple[str, ...], **kw: Any) -> subprocess.Popen:
        """Starts ``argv`` in namespace ``side`` ("a" or "b"); it is stopped when the link closes.
        Keyword arguments go to subprocess.Popen (stdin defaults to /dev/null, and the process
        gets its own session so that its children are stopped with it)."""
        self._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(side, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, side: str, argv: list[str] | tuple[str, ...], *, timeout: float = 120.0,
            **kw: Any) -> subprocess.CompletedProcess:
        """Runs ``argv`` in namespace ``side`` to completion (subprocess.run, bounded by ``timeout``)."""
        self._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(side, argv), timeout=timeout, **kw)

    # -- figures

    def _load_stats(self) -> dict | None:
        try:
            return json.loads(self._stats_path.read_text())
        except (OSError, ValueError):
            return None

    def stats(self) -> dict[str, Any]:
        """The forwarder's counters now: per direction ("a_to_b", "b_to_a") packets/bytes
        forwarded, dropped by loss, dropped by the queue, ...; plus "forwarder_cpu_s" (user +
        system CPU seconds from /proc/PID/stat, 10 ms ticks; split in "forwarder_cpu_user_s" and
        "forwarder_cpu_system_s"), "cpu_s" (the forwarder's own getrusage(), microseconds) and
        "elapsed_s" since the link started. After close(), the final counters.

        Most of the forwarder's CPU is system time spent inside write() on a TUN device: the
        kernel runs the receiving namespace's IP/TCP input (and the ACKs it sends) right there,
        work that a real host does in its softirqs anyway."""
        if self._closed or self._fwd is None:
            if self._last_stats is None:
                raise LinkError("the link never ran")
            return self._last_stats
        if self._fwd.poll() is not None:
            raise LinkError(f"forwarder exited with {self._fwd.returncode}: "
                            f"{self._err_path.read_text()[-2000:]}")
        with self._stats_lock:
            cpu = _proc_cpu_seconds(self._fwd.pid)
            self._fwd.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                data = self._load_stats()
                if data is not None and data.get("seq", 0) > self._seq:
                    self._seq = data["seq"]
                    self._last_stats = _add_cpu(data, cpu)
                    return data
                time.sleep(0.005)
        raise LinkError("the forwarder did not write its counters within 5 s")

    def info(self) -> dict[str, Any]:
        """Profile, congestion control actually set in each namespace, kernel, forwarder version."""
        if self._info is None:
            raise LinkError("the link is not started")
        return self._info


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
