"""Measure what each emulated link profile really gives: ping RTT, iperf3 throughput A -> B, and
what the forwarder costs in CPU.

    python -m bench.link.validate                      # every profile in PROFILES
    python -m bench.link.validate 100mbit-20ms --duration 10 --json out.json
    python -m bench.link.validate custom:rate=50e6,rtt=30,loss=0.001

Needs root, iproute2, a C compiler, iputils-ping and iperf3. For each profile: ~20 pings on the
idle link (median RTT against the profile's RTT), then one iperf3 TCP stream from A (client) to
B (server) for --duration seconds; "% of cap" is the receiver's goodput over the rate cap (TCP/IP
headers are ~3% of a 1500-byte packet, so ~95% is the ceiling). The forwarder's CPU is its user +
system time during the iperf3 run divided by the run's duration.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from .link import PROFILES, EmulatedLink, LinkProfile, unavailable_reason

_PING_TIME = re.compile(r"time=([0-9.]+) ms")


def parse_profile(name: str) -> tuple[str, LinkProfile]:
    if name in PROFILES:
        return name, PROFILES[name]
    if name.startswith("custom:"):
        keys = {"rate": "rate_bps", "rtt": "rtt_ms", "loss": "loss", "queue": "queue_bytes", "cc": "congestion"}
        kw: dict[str, Any] = {}
        for item in name[len("custom:"):].split(","):
            key, _, value = item.partition("=")
            field = keys.get(key)
            if field is None:
                raise SystemExit(f"unknown key {key!r} in {name!r} (known: {', '.join(keys)})")
            if field == "congestion":
                kw[field] = value
            else:
                kw[field] = int(float(value)) if field == "queue_bytes" else float(value)
        return name, LinkProfile(**kw)
    raise SystemExit(f"unknown profile {name!r}; known: {', '.join(PROFILES)} or custom:rate=..,rtt=..,loss=..")


def ping_rtts(link: EmulatedLink, count: int) -> list[float]:
    r = link.run("a", ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", link.addr_b],
                 capture_output=True, text=True, timeout=count * 0.05 + 10)
    return [float(x) for x in _PING_TIME.findall(r.stdout)]


def iperf(link: EmulatedLink, duration: float, port: int = 5201) -> dict[str, Any]:
    server = link.popen("b", ["iperf3", "-s", "-1", "-B", link.addr_b, "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:   # wait until the server listens
            r = link.run("b", ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=5) \
                if shutil.which("ss") else None
            if r is None or r.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if r is None:
            time.sleep(0.5)
        before = link.stats()
        t0 = time.monotonic()
        client = link.run("a", ["iperf3", "-c", link.addr_b, "-p", str(port), "-t", str(duration), "-J"],
                          capture_output=True, text=True, timeout=duration + 30)
        wall = time.monotonic() - t0
        after = link.stats()
    finally:
        server.kill()
        server.wait(5)
    try:
        result = json.loads(client.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 failed: {client.stdout[-500:]} {client.stderr[-500:]}") from None
    if "error" in result:
        raise RuntimeError(f"iperf3 failed: {result['error']}")
    end = result["end"]
    return {
        "received_bps": end["sum_received"]["bits_per_second"],
        "sent_bps": end["sum_sent"]["bits_per_second"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": end["sum_received"]["seconds"],
        "wall_s": wall,
        "congestion": end.get("sender_tcp_congestion"),
        "forwarder_cpu_s": after["forwarder_cpu_s"] - before["forwarder_cpu_s"],
        "forwarder_cpu_user_s": after["forwarder_cpu_user_s"] - before["forwarder_cpu_user_s"],
        "forwarder_cpu_s_rusage": after["cpu_s"] - before["cpu_s"],
        "a_to_b": {k: after["a_to_b"][k] - before["a_to_b"][k] for k in
                   ("rx_packets", "packets", "dropped_loss", "dropped_queue", "dropped_other")},
        "b_to_a": {k: after["b_to_a"][k] - before["b_to_a"][k] for k in
                   ("rx_packets", "packets", "dropped_loss", "dropped_queue", "dropped_other")},
        "max_packet": max(after["a_to_b"]["max_packet"], after["b_to_a"]["max_packet"]),
    }


def validate(name: str, profile: LinkProfile, *, seed: int, duration: float, pings: int) -> dict[str, Any]:
    with EmulatedLink(profile, seed=seed) as link:
        if name in PROFILES:
            link.profile_name = name
        rtts = ping_rtts(link, pings)
        perf = iperf(link, duration)
        info = link.info()
    a2b = perf["a_to_b"]
    return {
        "profile": name,
        "info": info,
        "ping": {"sent": pings, "received": len(rtts), "median_ms": statistics.median(rtts) if rtts else None,
                 "min_ms": min(rtts, default=None), "max_ms": max(rtts, default=None)},
        "iperf3": perf,
        "fraction_of_cap": perf["received_bps"] / profile.rate_bps if profile.rate_bps else None,
        "measured_loss_a_to_b": a2b["dropped_loss"] / a2b["rx_packets"] if a2b["rx_packets"] else None,
        "forwarder_cpu_per_s": perf["forwarder_cpu_s"] / perf["wall_s"],
        "forwarder_cpu_per_s_rusage": perf["forwarder_cpu_s_rusage"] / perf["wall_s"],
        "forwarder_user_cpu_per_s": perf["forwarder_cpu_user_s"] / perf["wall_s"],
    }


def table(results: list[dict[str, Any]]) -> str:
    head = ("profile", "cap Mb/s", "RTT ms", "ping med (min-max)", "iperf3 Mb/s", "% cap", "retr",
            "loss a>b", "q-drop a>b", "fwd CPU s/s", "of it user", "cc", "max pkt")
    rows = [head]
    for r in results:
        p = r["info"]["profile"]
        ping = r["ping"]
        perf = r["iperf3"]
        rows.append((
            r["profile"], f"{p['rate_bps'] / 1e6:g}", f"{p['rtt_ms']:g}",
            f"{ping['median_ms']:.1f} ({ping['min_ms']:.1f}-{ping['max_ms']:.1f})" if ping["median_ms"] else "-",
            f"{perf['received_bps'] / 1e6:.1f}",
            f"{100 * r['fraction_of_cap']:.0f}%" if r["fraction_of_cap"] is not None else "-",
            str(perf["retransmits"]),
            f"{100 * r['measured_loss_a_to_b']:.2f}%" if r["measured_loss_a_to_b"] is not None else "-",
            str(perf["a_to_b"]["dropped_queue"]),
            f"{r['forwarder_cpu_per_s']:.3f} ({r['forwarder_cpu_per_s_rusage']:.3f})",
            f"{r['forwarder_user_cpu_per_s']:.3f}",
            f"{r['info']['congestion']['a']}", str(perf["max_packet"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.link.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="*", help=f"default: all ({', '.join(PROFILES)})")
    ap.add_argument("--duration", type=float, default=8.0, help="iperf3 seconds (default 8)")
    ap.add_argument("--pings", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the full results here")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"cannot validate: {reason}", file=sys.stderr)
        return 2
    for tool, package in (("ping", "iputils-ping"), ("iperf3", "iperf3")):
        if shutil.which(tool) is None:
            print(f"cannot validate: `{tool}` is missing (Debian: apt-get install {package})", file=sys.stderr)
            return 2
    # SIGTERM becomes SystemExit, so the with-blocks and atexit remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for name in args.profiles or list(PROFILES):
        name, profile = parse_profile(name)
        print(f"{name}: {args.pings} pings, then iperf3 for {args.duration:g} s ...", file=sys.stderr, flush=True)
        results.append(validate(name, profile, seed=args.seed, duration=args.duration, pings=args.pings))
    print(table(results))
    print("fwd CPU s/s: forwarder CPU seconds per second of iperf3, from /proc/PID/stat (10 ms ticks; "
          "in parentheses, its own getrusage()); 'of it user': user-space part, the rest is the kernel "
          "running the receiving namespace's TCP/IP input inside the forwarder's write() to the TUN device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
