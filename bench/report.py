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
  storescp), and the forwarder's CPU seconds; ``*_cpu_s_per_gb``: those CPU seconds per GB
  (10^9 bytes) of verified DICOM moved, which compare across studies and links.

Per (profile, dataset, system), besides medians: ``codec`` (what the job says travelled: the
negotiated "Codec" of its Content, else the compression asked), ``vs_strict_gzip`` (goodput over
accel-{push|pull}-gzip-strict's, same profile, dataset and direction: the "current gzip" of the
run) and ``vs_old`` (goodput over the old tree's system of the same direction and compression;
-gzip-strict compares with old-*-gzip, plain gzip both). The codec table and the check of issue
12's targets are printed under the main table.
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
           "daemon_a_cpu_s", "daemon_a_peak_rss_mib", "daemon_b_cpu_s", "daemon_b_peak_rss_mib",
           "sender_cpu_s_per_gb", "receiver_cpu_s_per_gb")
#: issue 12's peak RSS bound, per daemon
RSS_LIMIT_BYTES = 300e6


def derive(run: dict, dicom_bytes: int, rate_bps: float | None) -> dict:
    """The metrics of one verified run (keys of METRICS, None where they do not apply)."""
    wall = run["wall_s"]
    gzip = "-gzip" in run["system"]             # -gzip, -gzip-strict: compressed systems
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
            if run["verified_bytes"]:
                m[f"{role}_cpu_s_per_gb"] = u["cpu_s"] / (run["verified_bytes"] / 1e9)
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
        codecs = [((r.get("job") or {}).get("content") or {}).get("Codec") for r in ok]
        codecs = sorted({c for c in codecs if c})
        entry = {"profile": profile, "dataset": dataset, "system": system, "runs": len(rs), "ok_runs": len(ok),
                 "codec": "/".join(codecs) or _asked(system),
                 "errors": [r["error"] for r in rs if not r["ok"]][:5],
                 "metrics": {k: _stat([r["metrics"].get(k) for r in ok]) for k in (*METRICS, "payload_ratio")}}
        out.append(entry)
    # goodput relative to the per-instance baseline of the same profile and dataset
    base = {(e["profile"], e["dataset"]): e["metrics"]["goodput_mb_s"] for e in out
            if e["system"] == "per-instance-http" and e["metrics"]["goodput_mb_s"]}
    for e in out:
        b, g = base.get((e["profile"], e["dataset"])), e["metrics"]["goodput_mb_s"]
        e["vs_per_instance"] = g["median"] / b["median"] if b and g else None
    goodput = {(e["profile"], e["dataset"], e["system"]): e["metrics"]["goodput_mb_s"] for e in out}
    for e in out:
        g = e["metrics"]["goodput_mb_s"]
        e["vs_strict_gzip"] = e["vs_old"] = None
        parts = e["system"].split("-")
        if len(parts) < 3 or parts[0] not in ("accel", "old") or not g:
            continue
        strict = goodput.get((e["profile"], e["dataset"], f"accel-{parts[1]}-gzip-strict"))
        old = goodput.get((e["profile"], e["dataset"], f"old-{parts[1]}-{parts[2]}")) if parts[0] == "accel" else None
        e["vs_strict_gzip"] = g["median"] / strict["median"] if strict else None
        e["vs_old"] = g["median"] / old["median"] if old else None
    return out


def _asked(system: str) -> str:
    """The compression a system asks for (its job JSON names no codec: old tree, or plain)."""
    parts = system.split("-")
    if len(parts) >= 3 and parts[0] in ("accel", "old"):
        return "gzip (strict)" if parts[3:] == ["strict"] else parts[2]
    return "–"


def _max(s: dict | None) -> float | None:
    return None if s is None else s["max"]


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
    if meta.get("old_tree"):
        lines.append(f"- old-* systems: daemons started from {meta['old_tree']} (commit "
                     f"{str(meta.get('old_tree_commit'))[:7]}, code sha256 {str(meta.get('old_code_sha256'))[:12]}), "
                     "same Python, same link, runs interleaved with ours")
    for name, p in results["profiles"].items():
        for key, sha in (p.get("code_sha256") or {}).items():   # fixed when that profile's daemons started
            lines.append(f"- {name} {key}: daemons started {(p.get('started') or {}).get(key, '?')}, "
                         f"code sha256 {sha[:12]}")
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
    lines += codec_table(results)
    lines += targets(results)
    return "\n".join(lines) + "\n"


def codec_table(results: dict) -> list[str]:
    """Our systems only (new tree and old tree): goodput, share of the limit, the ratios to the
    run's strict gzip and to the old tree, CPU per GB and the worst peak RSS of each side."""
    entries = [e for e in results["summary"] if e["system"].startswith(("accel-", "old-"))]
    if not entries:
        return []
    lines = ["", "## Codecs: new main vs strict gzip vs old main", "",
             "× strict gzip: goodput / accel-{push,pull}-gzip-strict (same run, profile, direction); "
             "× old: / old-{push,pull}-{gzip,none} (strict gzip compares with old gzip). CPU s/GB: per GB "
             "of DICOM moved, medians; RSS: the largest peak over the runs (bound: 300 MB = 286 MiB).", "",
             "| profile | data | system | codec | ok | goodput MB/s | of limit | ratio | × strict gzip | × old "
             "| sender CPU s/GB | receiver CPU s/GB | sender RSS MiB (max) | receiver RSS MiB (max) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        m = e["metrics"]
        d = results["datasets"][e["dataset"]]
        data = f"{d['kind']} {d['instances']}"
        ok = f"{e['ok_runs']}/{e['runs']}"
        if not e["ok_runs"]:
            lines.append(f"| {e['profile']} | {data} | {e['system']} | {e['codec']} | {ok} | failed |" + " |" * 8)
            continue
        vs = ["–" if v is None else f"{v:.2f}×" for v in (e.get("vs_strict_gzip"), e.get("vs_old"))]
        lines.append(
            f"| {e['profile']} | {data} | {e['system']} | {e['codec']} | {ok} | {_mm(m['goodput_mb_s'], 2)} | "
            f"{_med(m['of_limit'], 0, 100)}{'%' if m['of_limit'] else ''} | {_med(m['compression_ratio'], 2)} | "
            f"{vs[0]} | {vs[1]} | {_med(m['sender_cpu_s_per_gb'], 1)} | {_med(m['receiver_cpu_s_per_gb'], 1)} | "
            f"{_f(_max(m['sender_peak_rss_mib']), 0)} | {_f(_max(m['receiver_peak_rss_mib']), 0)} |")
    return lines


def targets(results: dict) -> list[str]:
    """Issue 12's benchmark targets, checked on the medians of this run (only those it measured)."""
    by = {(e["profile"], e["system"], results["datasets"][e["dataset"]]["kind"]): e for e in results["summary"]}
    rows = []

    def check(what: str, value: float | None, bound: float, fmt: str) -> None:
        if value is not None:
            rows.append(f"| {what} | {fmt.format(value)} | {fmt.format(bound)} | {'yes' if value >= bound else 'NO'} |")

    for profile in ("20mbit-50ms-0.5loss", "10mbit-100ms-1loss"):
        for mode in ("push", "pull"):
            e = by.get((profile, f"accel-{mode}-gzip", "ct")) or by.get((profile, f"accel-{mode}-gzip", "mr"))
            if e:
                check(f"{profile} {mode} gzip ({e['codec']}, {results['datasets'][e['dataset']]['kind']}): "
                      "× strict gzip", e.get("vs_strict_gzip"), 1.35, "{:.2f}×")
    for mode in ("push", "pull"):
        for kind in ("ct", "mr"):
            e = by.get(("100mbit-20ms", f"accel-{mode}-gzip", kind))
            if e and e["metrics"]["of_limit"]:
                check(f"100mbit-20ms {mode} gzip ({e['codec']}, {kind}): of limit",
                      e["metrics"]["of_limit"]["median"] * 100, 90, "{:.0f}%")
            e = by.get(("100mbit-20ms", f"accel-{mode}-gzip-strict", kind))
            if e and e["metrics"]["of_limit"]:
                check(f"100mbit-20ms {mode} gzip-strict ({kind}): of limit",
                      e["metrics"]["of_limit"]["median"] * 100, 90, "{:.0f}%")
    for mode in ("push", "pull"):
        e = by.get(("loopback", f"accel-{mode}-none", "ct"))
        if e:
            check(f"loopback ct {mode} none: × old main", e.get("vs_old"), 1.5, "{:.2f}×")
    worst = [(_max(e["metrics"][f"{role}_peak_rss_mib"]), e["system"], e["profile"])
             for e in results["summary"] if e["system"].startswith("accel-") for role in ("sender", "receiver")]
    worst = [w for w in worst if w[0] is not None]
    if worst:
        rss, system, profile = max(worst)
        rows.append(f"| peak RSS, any daemon of ours ({system}, {profile}) | {rss * MIB / 1e6:.0f} MB | ≤ 300 MB | "
                    f"{'yes' if rss * MIB <= RSS_LIMIT_BYTES else 'NO'} |")
    if not rows:
        return []
    return ["", "## Issue 12 targets (medians of this run)", "", "| target | measured | bound | met |",
            "|---|---:|---:|---|", *rows]
