"""Figures of the transfer benchmark: per-run metrics, medians with min and max, the markdown table.

Per run (only runs whose data was verified on the receiver are measured):

- ``wall_s``; ``goodput_mb_s`` = verified DICOM bytes / wall (MB = 10^6 bytes);
- ``wire_mb``: IP bytes both hosts put on the link (both directions, headers included, lost
  packets included), from the forwarder's counters; ``link_use``: bits the link carried
  a -> b (the data direction of every system) / (rate x wall);
- ``compression_ratio``: 1.0 for every system but the gzip ones, for which it is the DICOM bytes
  over the TCP payload carried a -> b (IP bytes - 52 header bytes per packet: IPv4 + TCP with
  timestamps), i.e. what gzip achieved including HTTP framing; on loopback (no counters) it is
  the job's TotalSizeMB / Uploaded|DownloadedSizeMB (whole MiB, so approximate);
- ``limit_mb_s`` = rate / 8 x compression_ratio, ``of_limit`` = goodput / limit (TCP/IP headers
  alone keep an uncompressed transfer at <= ~96.5%); both null on loopback;
- CPU seconds and peak RSS (VmHWM, reset before each run) of the sender and the receiver
  (accelerator: daemons a and b; per-instance-http: the client and daemon b; dcmtk: storescu and
  storescp), and the forwarder's CPU seconds.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

__all__ = ["METRICS", "derive", "markdown", "summarize"]

TCPIP_HEADER = 52
MIB = 2**20
METRICS = ("wall_s", "goodput_mb_s", "wire_mb", "link_use", "compression_ratio", "limit_mb_s", "of_limit",
           "sender_cpu_s", "sender_peak_rss_mib", "receiver_cpu_s", "receiver_peak_rss_mib", "forwarder_cpu_s",
           "daemon_a_cpu_s", "daemon_a_peak_rss_mib", "daemon_b_cpu_s", "daemon_b_peak_rss_mib")


def derive(run: dict, dicom_bytes: int, rate_bps: float | None) -> dict:
    """The metrics of one verified run (keys of METRICS, None where they do not apply)."""
    wall = run["wall_s"]
    gzip = run["system"].endswith("-gzip")
    m: dict[str, Any] = {k: None for k in METRICS}
    m["wall_s"] = wall
    m["goodput_mb_s"] = run["verified_bytes"] / wall / 1e6
    stats = run.get("link_stats")
    ratio = 1.0
    if stats:
        a2b, b2a = stats["a_to_b"], stats["b_to_a"]
        m["wire_mb"] = (a2b["rx_bytes"] + b2a["rx_bytes"]) / 1e6
        if rate_bps:
            m["link_use"] = a2b["bytes"] * 8 / (rate_bps * wall)
        payload = a2b["bytes"] - TCPIP_HEADER * a2b["packets"]
        m["payload_ratio"] = dicom_bytes / payload if payload > 0 else None
        if gzip and m["payload_ratio"]:
            ratio = m["payload_ratio"]
        m["forwarder_cpu_s"] = stats["forwarder_cpu_s"]
        m["dropped_a2b_mb"] = (a2b["dropped_loss_bytes"] + a2b["dropped_queue_bytes"]) / 1e6
    elif gzip:
        content = (run.get("job") or {}).get("content", {})
        sent = content.get("UploadedSizeMB") or content.get("DownloadedSizeMB")
        if sent and content.get("TotalSizeMB"):
            ratio = content["TotalSizeMB"] / sent
    m["compression_ratio"] = ratio
    if rate_bps:
        m["limit_mb_s"] = rate_bps / 8 * ratio / 1e6
        m["of_limit"] = m["goodput_mb_s"] / m["limit_mb_s"]
    usage = run.get("usage", {})
    for role in ("sender", "receiver"):
        u = usage.get(run.get(role))
        if u:
            m[f"{role}_cpu_s"] = u["cpu_s"]
            m[f"{role}_peak_rss_mib"] = u["peak_rss_bytes"] / MIB
    for side in ("a", "b"):
        u = usage.get(f"daemon-{side}")
        if u:
            m[f"daemon_{side}_cpu_s"] = u["cpu_s"]
            m[f"daemon_{side}_peak_rss_mib"] = u["peak_rss_bytes"] / MIB
    return m


def _stat(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> list[dict]:
    """One entry per (profile, dataset, system), in the order first seen: medians, min, max."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["profile"], r["dataset"], r["system"]), []).append(r)
    out = []
    for (profile, dataset, system), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        entry = {"profile": profile, "dataset": dataset, "system": system, "runs": len(rs), "ok_runs": len(ok),
                 "errors": [r["error"] for r in rs if not r["ok"]][:5],
                 "metrics": {k: _stat([r["metrics"].get(k) for r in ok]) for k in (*METRICS, "payload_ratio")}}
        out.append(entry)
    # goodput relative to the per-instance baseline of the same profile and dataset
    base = {(e["profile"], e["dataset"]): e["metrics"]["goodput_mb_s"] for e in out
            if e["system"] == "per-instance-http" and e["metrics"]["goodput_mb_s"]}
    for e in out:
        b, g = base.get((e["profile"], e["dataset"])), e["metrics"]["goodput_mb_s"]
        e["vs_per_instance"] = g["median"] / b["median"] if b and g else None
    return out


def _f(v: float | None, digits: int = 1, scale: float = 1.0) -> str:
    if v is None:
        return "–"
    v *= scale
    if abs(v) >= 100 and digits > 0:
        digits = 0
    return f"{v:.{digits}f}"


def _mm(s: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    """median [min–max]"""
    if s is None:
        return "–"
    return f"{_f(s['median'], digits, scale)} [{_f(s['min'], digits, scale)}–{_f(s['max'], digits, scale)}]"


def _med(s: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    return "–" if s is None else _f(s["median"], digits, scale)


def markdown(results: dict) -> str:
    """The results table (one per dataset kind), with the conditions above it."""
    meta = results["meta"]
    load_end = meta.get("load_end") or list(os.getloadavg())
    lines = [f"# Transfer benchmark {meta['started']}", "",
             (f"{meta['cpus']} CPUs, load average {meta['load_start'][0]:.2f} at start / "
              f"{load_end[0]:.2f} at end; {meta['runs']} run(s) per system; "
              f"cells are median [min–max] over the verified runs, other columns medians; code under test "
              f"sha256 {str(meta.get('code_sha256'))[:12]} (accelerator/ + protocol/)."), ""]
    for name, p in results["profiles"].items():
        if p.get("link"):
            info = p["link"]
            prof = info["profile"]
            lines.append(f"- **{name}**: {prof['rate_bps'] / 1e6:g} Mbit/s, RTT {prof['rtt_ms']:g} ms, loss "
                         f"{prof['loss'] * 100:g}%, queue {prof['effective_queue_bytes'] // 1024} KiB, congestion "
                         f"control {info['congestion']['a']}/{info['congestion']['b']} (a/b)")
        else:
            lines.append(f"- **{name}**: {p.get('note', 'both daemons on 127.0.0.1, no emulation')}")
    if meta.get("daemon_config"):
        lines.append(f"- daemon configuration added: `{json.dumps(meta['daemon_config'])}`")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    lines.append("sender/receiver: accel-* = daemon a / daemon b; per-instance-http = client / daemon b; "
                 "dcmtk-cstore = storescu / storescp. ratio: compression achieved (gzip), limit = rate × ratio.")
    kinds: dict[str, list[dict]] = {}
    for e in results["summary"]:
        kinds.setdefault(results["datasets"][e["dataset"]]["kind"], []).append(e)
    for kind, entries in kinds.items():
        lines += ["", f"## {kind}", "",
                  ("| profile | data | system | ok | wall s | goodput MB/s | × per-inst | wire MB | link use | ratio "
                   "| limit MB/s | of limit | sender CPU s | sender RSS MiB | receiver CPU s | receiver RSS MiB "
                   "| fwd CPU s |"),
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in entries:
            m = e["metrics"]
            d = results["datasets"][e["dataset"]]
            data = f"{d['instances']} inst, {d['bytes'] / 1e6:.0f} MB"
            ok = f"{e['ok_runs']}/{e['runs']}"
            if not e["ok_runs"]:
                err = (e["errors"][0] if e["errors"] else "?").replace("|", "/").replace("\n", " ")[:120]
                lines.append(f"| {e['profile']} | {data} | {e['system']} | {ok} | failed: {err} |"
                             + " |" * 12)
                continue
            vs = "–" if e["vs_per_instance"] is None else f"{e['vs_per_instance']:.1f}×"
            lines.append(
                f"| {e['profile']} | {data} | {e['system']} | {ok} | {_mm(m['wall_s'], 2)} | "
                f"{_mm(m['goodput_mb_s'], 1)} | {vs} | {_med(m['wire_mb'], 0)} | {_med(m['link_use'], 0, 100)}"
                f"{'%' if m['link_use'] else ''} | {_med(m['compression_ratio'], 2)} | {_med(m['limit_mb_s'], 2)} | "
                f"{_mm(m['of_limit'], 0, 100)}{'%' if m['of_limit'] else ''} | {_med(m['sender_cpu_s'], 1)} | "
                f"{_med(m['sender_peak_rss_mib'], 0)} | {_med(m['receiver_cpu_s'], 1)} | "
                f"{_med(m['receiver_peak_rss_mib'], 0)} | {_med(m['forwarder_cpu_s'], 1)} |")
    return "\n".join(lines) + "\n"
