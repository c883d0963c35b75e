"""bench.link: the emulated link really has the rate, delay and loss it was asked for, and leaves
nothing behind. Traffic stays between the two namespaces each test makes (198.18.0.0/15)."""
from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from bench.link import PROFILES, EmulatedLink, LinkError, LinkProfile, build_forwarder, unavailable_reason
from bench.link import link as link_module

REASON = unavailable_reason()
needs_link = pytest.mark.skipif(REASON is not None, reason=f"emulated link unavailable: {REASON}")

PORT = 5301   # inside our own namespaces: nothing else listens there

# Runs in namespace B: a UDP echo and a TCP sink that answers with what it received and how long
# the data took to arrive (first byte to end of stream).
SERVER = textwrap.dedent("""
    import json, socket, sys, threading, time
    addr, port = sys.argv[1], int(sys.argv[2])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((addr, port))
    tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((addr, port)); tcp.listen(4)
    def echo():
        while True:
            data, peer = udp.recvfrom(65536)
            udp.sendto(data, peer)
    threading.Thread(target=echo, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        total, first = 0, None
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            if first is None:
                first = time.monotonic()
            total += len(chunk)
        conn.sendall(json.dumps({"bytes": total, "seconds": time.monotonic() - (first or time.monotonic())}).encode())
        conn.close()
""")

# Runs in namespace A: N timed UDP echoes (RTT), or a TCP stream of `seconds`, or a UDP burst.
CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    addr, port, mode, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    if mode == "rtt":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        rtts = []
        for i in range(int(arg)):
            t = time.monotonic(); s.sendto(b"x" * 56, (addr, port))
            try:
                s.recvfrom(100); rtts.append((time.monotonic() - t) * 1000)
            except socket.timeout:
                pass
            time.sleep(0.02)
        print(json.dumps(rtts))
    elif mode == "tcp":
        s = socket.create_connection((addr, port), timeout=30)
        block, end = b"\\0" * (1 << 16), time.monotonic() + arg
        while time.monotonic() < end:
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        print(s.recv(1000).decode())
    elif mode == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(int(arg)):
            s.sendto(b"y" * 1000, (addr, port))
            if i % 20 == 19:
                time.sleep(0.002)   # stay well under the rate: loss, not queue drops, is tested
        print("{}")
""")


def start_server(link: EmulatedLink) -> subprocess.Popen:
    proc = link.popen("b", [sys.executable, "-c", SERVER, link.addr_b, str(PORT)],
                      stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready and proc.stdout.readline().strip() == "ready", "test server did not start"
    return proc


def client(link: EmulatedLink, mode: str, arg: float, timeout: float = 20):
    r = link.run("a", [sys.executable, "-c", CLIENT, link.addr_b, str(PORT), mode, str(arg)],
                 capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_gone(link: EmulatedLink, forwarder_pid: int) -> None:
    for ns in (link.ns_a, link.ns_b):
        assert not os.path.exists(f"/run/netns/{ns}"), f"namespace {ns} left behind"
    ip = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert link.ns_a not in ip and link.ns_b not in ip
    assert not os.path.exists(f"/proc/{forwarder_pid}"), "forwarder still running"


# ------------------------------------------------------------------ without root

def test_profiles() -> None:
    assert set(PROFILES) >= {"100mbit-20ms", "20mbit-50ms-0.5loss", "10mbit-100ms-1loss"}
    p = PROFILES["100mbit-20ms"]
    assert p.one_way_delay_ms == 10
    assert p.effective_queue_bytes == 250_000                      # one BDP: 100 Mbit/s x 20 ms
    assert LinkProfile(1e6, 10).effective_queue_bytes == 64 * 1024  # the floor
    assert PROFILES["20mbit-50ms-0.5loss"].congestion == "cubic"
    with pytest.raises(ValueError):
        LinkProfile(1e6, 10, loss=1.5)
    with pytest.raises(ValueError):
        EmulatedLink(p, addr_a="10.0.0.1")                          # only the benchmarking range
    with pytest.raises(KeyError):
        EmulatedLink("no-such-profile")


@pytest.mark.skipif(REASON is not None and "root" not in REASON, reason=f"no compiler: {REASON}")
def test_forwarder_builds_and_is_cached() -> None:
    binary = build_forwarder()
    assert binary.exists() and os.access(binary, os.X_OK)
    assert binary.name.endswith(link_module._source_digest()[:16])   # rebuilt when the source changes
    assert build_forwarder() == binary
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.strip()


def test_message_when_not_root(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert link_module.unavailable_reason() == link_module.NOT_ROOT_MESSAGE
    with pytest.raises(LinkError, match="root"):
        EmulatedLink(LinkProfile(1e6, 10)).start()


# ------------------------------------------------------------------ the real link

@needs_link
@pytest.mark.slow
def test_rate_and_delay() -> None:
    profile = LinkProfile(rate_bps=20e6, rtt_ms=40, loss=0.0)
    with EmulatedLink(profile, seed=3) as link:
        pid = link.info()["forwarder"]["pid"]
        info = link.info()
        assert info["congestion"]["a"] == info["congestion"]["b"] == info["congestion"]["kernel_default"]
        start_server(link)
        rtts = client(link, "rtt", 15)
        assert len(rtts) == 15
        assert 40 * 0.8 <= statistics.median(rtts) <= 40 * 1.2, rtts
        result = client(link, "tcp", 3.0)
        rate = result["bytes"] * 8 / result["seconds"]
        assert result["bytes"] > 3_000_000
        assert 0.70 * 20e6 <= rate <= 1.05 * 20e6, f"{rate / 1e6:.1f} Mbit/s"
        stats = link.stats()
        for direction in ("a_to_b", "b_to_a"):
            d = stats[direction]
            assert d["dropped_loss"] == 0 and d["dropped_other"] == 0 and d["write_errors"] == 0
            assert d["max_packet"] <= 1500          # no GSO/TSO super-packets skip the rate
        assert stats["a_to_b"]["bytes"] >= result["bytes"]
        assert stats["forwarder_cpu_s"] >= 0 and stats["cpu_s"] > 0
    assert_gone(link, pid)
    assert link.stats()["final"] is True            # the last counters stay readable


@needs_link
@pytest.mark.slow
def test_loss_counters_and_congestion_control() -> None:
    profile = LinkProfile(rate_bps=50e6, rtt_ms=4, loss=0.10, queue_bytes=4_000_000, congestion="cubic")
    n = 3000
    with EmulatedLink(profile, seed=11) as link:
        pid = link.info()["forwarder"]["pid"]
        assert link.info()["congestion"]["a"] == link.info()["congestion"]["b"] == "cubic"
        out = link.run("a", ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"], capture_output=True, text=True)
        assert out.stdout.strip() == "cubic"
        start_server(link)
        client(link, "udp", n)
        time.sleep(0.3)                                  # the last packets and their echoes land
        stats = link.stats()
    assert_gone(link, pid)
    a2b, b2a = stats["a_to_b"], stats["b_to_a"]
    assert a2b["rx_packets"] >= n * 0.95                 # (a few may not reach the TUN at all)
    # 10% of n=3000: mean 300, standard deviation ~16; the band is about +-5 sigma.
    assert 0.07 <= a2b["dropped_loss"] / a2b["rx_packets"] <= 0.13, a2b
    assert 0.07 <= b2a["dropped_loss"] / b2a["rx_packets"] <= 0.13, b2a   # the echoes
    assert a2b["dropped_queue"] == 0
    for d in (a2b, b2a):
        assert d["packets"] + d["dropped_loss"] + d["in_flight_packets"] == d["rx_packets"], d


@needs_link
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_cleanup_on_error(error) -> None:
    with pytest.raises(error, match="boom"):
        with EmulatedLink(LinkProfile(10e6, 2), seed=1) as link:
            pid = link.info()["forwarder"]["pid"]
            sleeper = link.popen("a", ["sleep", "60"])
            raise error("boom")
    assert_gone(link, pid)
    assert sleeper.poll() is not None                      # processes started in the namespaces die too
    with pytest.raises(LinkError):
        link.run("a", ["true"])


@needs_link
def test_nothing_survives_a_killed_owner() -> None:
    """SIGKILL of the process that made the link: the forwarder exits (its pipe from the owner
    closes) and the next link made on the machine deletes the orphaned namespaces."""
    code = ("import sys, time; from bench.link import EmulatedLink, LinkProfile\n"
            "link = EmulatedLink(LinkProfile(10e6, 2)).start()\n"
            "link.popen('b', ['sleep', '60'])\n"
            "print(link.ns_a, link.ns_b, link.info()['forwarder']['pid'], flush=True); time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=str(link_module.HERE.parent.parent))
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 15)
        assert ready
        ns_a, ns_b, pid = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait(10)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}"), "forwarder outlived its owner"
    assert os.path.exists(f"/run/netns/{ns_a}")         # orphaned until someone cleans up
    removed = link_module.cleanup_stale()
    assert {ns_a, ns_b} <= set(removed)
    assert not os.path.exists(f"/run/netns/{ns_a}") and not os.path.exists(f"/run/netns/{ns_b}")


@needs_link
def test_atexit_cleans_up_a_link_never_closed() -> None:
    code = ("from bench.link import EmulatedLink, LinkProfile\n"
            "link = EmulatedLink(LinkProfile(10e6, 2)).start()\n"
            "print(link.ns_a, link.ns_b, link.info()['forwarder']['pid'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=str(link_module.HERE.parent.parent))
    assert r.returncode == 0, r.stderr
    ns_a, ns_b, pid = r.stdout.split()
    assert not os.path.exists(f"/run/netns/{ns_a}") and not os.path.exists(f"/run/netns/{ns_b}")
    assert not os.path.exists(f"/proc/{pid}")
