"""The two hosts of the transfer benchmark and the systems that move a study between them.

A ``Testbed`` is two hosts, "a" (the source) and "b" (the receiver), each running one daemon:
either in the two network namespaces of an ``EmulatedLink`` (every byte between them crosses the
forwarder), or both on this machine's loopback (the "loopback" profile). The benchmark process
itself stays in the root namespace, which has no route to the link; it talks to each daemon
from a thread that entered that host's namespace (bench/netns.py), over the namespace's own
loopback, so uploads, job polling and verification never cross the link. Programs such as
storescu run in a namespace through ``ip netns exec``.

Systems (all move the same study from a to b):

- ``accel-push-{gzip,none}``: a runs ``POST /transfers/send`` to peer b (PushTransfer job);
- ``accel-pull-{gzip,none}``: b runs ``POST /transfers/pull`` from peer a (PullTransfer job);
  between two of our daemons "gzip" travels as the negotiated codec (shuffle-zstd), which the
  job's Content names ("Codec", kept in the run's record);
- ``accel-{push,pull}-gzip-strict``: the same with ``"StrictCompression": true``: plain gzip, what
  a real plugin gets, and the "current gzip" baseline the negotiated codec is measured against;
- ``old-{push,pull}-{gzip,none}`` (``Testbed(root=...)``, bench ``--old-tree``): the same
  transfers between two daemons started from another source tree, e.g. a ``git worktree`` of
  the morning's main, on the same link in the same run: "today's figure" for the comparison;
- ``per-instance-http``: what Orthanc's ``/peers/{peer}/store`` does, one ``POST /instances``
  per instance, sequentially, over one kept-alive connection; a small client process in host a
  (``python -m bench.systems post-instances``) reading the study's files;
- ``dcmtk-cstore``: DCMTK's storescu in host a sends every file in one association to storescp
  in host b, which writes them to a folder (``+B``: the data set exactly as received); each
  (SOP class, transfer syntax) of the study gets its own presentation context, so compressed
  files are sent as they are; ``TCP_NODELAY=1`` for both.

Wall time: accelerator systems from the creation request to the poll that sees ``Success``
(polled every 20 ms at first, then every 2% of the elapsed time, at most 200 ms);
per-instance-http from the client's first request to its last answer (the client's own
CLOCK_MONOTONIC, shared by the whole machine); dcmtk from starting storescu to its exit.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.datasets import StudyManifest
from bench.harness import REPO_ROOT, Daemon, free_port
from bench.netns import NsThread, listening

__all__ = ["ABORT", "ACCEL_SYSTEMS", "OLD_SYSTEMS", "SYSTEMS", "RunFailed", "Testbed", "dcmtk_missing", "run_system"]

SYSTEMS = ("accel-push-gzip", "accel-push-gzip-strict", "accel-push-none", "accel-pull-gzip",
           "accel-pull-gzip-strict", "accel-pull-none", "per-instance-http", "dcmtk-cstore")
ACCEL_SYSTEMS = tuple(s for s in SYSTEMS if s.startswith("accel-"))
#: run by the daemons of the other tree (``--old-tree``); "gzip" there is whatever that tree did
OLD_SYSTEMS = ("old-push-gzip", "old-push-none", "old-pull-gzip", "old-pull-none")
DCMTK_ENV = {"TCP_NODELAY": "1"}
#: set when the bench is interrupted: waiting loops in the hosts' threads give up at once
ABORT = threading.Event()


class RunFailed(RuntimeError):
    """One measured run went wrong (job failure, timeout, verification); the bench goes on.
    ``partial`` keeps what was measured before the failure was found."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial


def dcmtk_missing() -> str | None:
    missing = [p for p in ("storescu", "storescp") if shutil.which(p) is None]
    return f"{' and '.join(missing)} not installed (Debian: apt-get install dcmtk)" if missing else None


def _rss_reset(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass


# ------------------------------------------------------------------------------------ hosts

@dataclass
class Host:
    side: str                    # "a" or "b"
    ns: str | None               # network namespace, None on loopback
    addr: str                    # the address the other host reaches this one at
    thread: NsThread = field(repr=False)

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv] if self.ns else list(argv)

    def call(self, fn: Callable, *args, **kw):
        return self.thread.call(fn, *args, **kw)


class Site:
    """A host's daemon and an HTTP client to it that is only ever used from the host's thread."""

    def __init__(self, host: Host, config: dict, workdir: Path, root: Path | None = None):
        self.host = host
        self.daemon = Daemon(config, workdir, prefix=tuple(host.argv([])), start_timeout=60, root=root)
        self.client: httpx.Client | None = None

    @property
    def port(self) -> int:
        return self.daemon.config["HttpPort"]

    def start(self) -> None:
        def go():
            self.daemon.start()
            self.client = httpx.Client(base_url=self.daemon.url, timeout=120, trust_env=False)
        self.host.call(go)

    def stop(self) -> None:
        def go():
            if self.client is not None:
                self.client.close()
            self.daemon.stop()
        self.host.call(go)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        return self.host.call(self.client.request, method, path, **kw)

    def json(self, method: str, path: str, **kw) -> Any:
        r = self.request(method, path, **kw)
        if r.status_code != 200:
            raise RunFailed(f"{self.host.side}: {method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def usage(self) -> tuple[float, int]:
        return self.daemon.usage(include_descendants=True)


def _merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in (objects merged key by key, everything else replaced)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Testbed:
    """Hosts a and b with their daemons, on an EmulatedLink (``link``) or on loopback (None).

    ``root``: the source tree the two daemons run (default: this one). Two testbeds can share a
    link (one per tree, so their runs interleave); ``avoid_ports`` keeps the second one's ports
    off the first one's, since both daemons of a side then live in the same namespace."""

    def __init__(self, workdir: Path, link=None, extra_config: dict | None = None, root: Path | None = None,
                 avoid_ports: tuple[int, ...] = ()):
        self.link = link
        self.root = root
        self.workdir = Path(workdir)
        ns_a, ns_b = (link.ns_a, link.ns_b) if link else (None, None)
        addr_a, addr_b = (link.addr_a, link.addr_b) if link else ("127.0.0.1", "127.0.0.1")
        self.a = Host("a", ns_a, addr_a, NsThread(ns_a, "host-a"))
        self.b = Host("b", ns_b, addr_b, NsThread(ns_b, "host-b"))
        # In a namespace every port is free; on loopback the two daemons need different ones.
        taken = set(avoid_ports)
        ports = []
        for _ in range(100):                      # bounded: free ports are plenty
            p = free_port()
            if p not in taken:
                taken.add(p)
                ports.append(p)
            if len(ports) == 2:
                break
        port_a, port_b = ports
        bind = "0.0.0.0" if link else "127.0.0.1"
        common = {"HttpBindAddress": bind, "RemoteAccessAllowed": True, "AuthenticationEnabled": False}
        config_a = {**common, "Name": "bench-a", "HttpPort": port_a,
                    "OrthancPeers": {"b": [f"http://{addr_b}:{port_b}/"]}}
        config_b = {**common, "Name": "bench-b", "HttpPort": port_b,
                    "OrthancPeers": {"a": [f"http://{addr_a}:{port_a}/"]}}
        self.site_a = Site(self.a, _merged(config_a, extra_config or {}), self.workdir / "a", root)
        self.site_b = Site(self.b, _merged(config_b, extra_config or {}), self.workdir / "b", root)

    def start(self) -> Testbed:
        try:
            self.site_a.start()
            self.site_b.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for site in (self.site_b, self.site_a):
            try:
                site.stop()
            except Exception as e:  # noqa: BLE001 -- stop the other one all the same
                print(f"bench: stopping daemon {site.host.side}: {e}", file=sys.stderr)
        for host in (self.a, self.b):
            host.thread.close()

    def alive(self) -> bool:
        return self.site_a.alive() and self.site_b.alive()

    # -- data

    def upload(self, manifest: StudyManifest) -> float:
        """Stores the study in a (from a's own loopback); returns the upload's wall time."""
        from bench.ingest import upload_all
        t = time.perf_counter()
        res = self.a.call(lambda: asyncio.run(upload_all(self.site_a.daemon.url, manifest, 4, None)))
        if res["problems"]:
            raise RunFailed("upload to a failed: " + "; ".join(res["problems"][:5]))
        count = self.site_a.json("GET", "/statistics")["CountInstances"]
        if count != len(manifest.files):
            raise RunFailed(f"a holds {count} instances after the upload, expected {len(manifest.files)}")
        return time.perf_counter() - t

    def empty_b(self) -> None:
        for patient in self.site_b.json("GET", "/patients"):
            r = self.site_b.request("DELETE", f"/patients/{patient}")
            if r.status_code not in (200, 404):
                raise RunFailed(f"b: DELETE /patients/{patient}: HTTP {r.status_code}")
        left = self.site_b.json("GET", "/statistics")["CountInstances"]
        if left:
            raise RunFailed(f"b still holds {left} instances after deleting every patient")

    def verify_b(self, manifest: StudyManifest, ids: list[str]) -> tuple[int, list[str]]:
        """(verified DICOM bytes, problems): b must hold exactly the study, with the right MD5s."""
        def go():
            c = self.site_b.client
            problems, good = [], 0
            count = c.get("/statistics").json()["CountInstances"]
            if count != len(ids):
                problems.append(f"b holds {count} instances, expected {len(ids)}")
            for f, iid in zip(manifest.files, ids):
                r = c.get(f"/instances/{iid}/attachments/dicom/md5")
                if r.status_code != 200:
                    problems.append(f"{f.path}: md5 of {iid}: HTTP {r.status_code}")
                elif r.text.strip().strip('"') != f.md5:
                    problems.append(f"{f.path}: MD5 {r.text.strip()} != {f.md5}")
                else:
                    good += f.size
            return good, problems
        return self.b.call(go)


# ------------------------------------------------------------------------------------ systems

def _poll_interval(elapsed: float) -> float:
    return min(0.2, max(0.02, elapsed / 50))


def _accel(bed: Testbed, system: str, manifest: StudyManifest, study_id: str, timeout: float) -> dict:
    _, mode, compression, *flags = system.split("-")     # accel|old, push|pull, gzip|none, [strict]
    site, peer, route = (bed.site_a, "b", "send") if mode == "push" else (bed.site_b, "a", "pull")
    body = {"Peer": peer, "Resources": [{"Level": "Study", "ID": study_id}], "Compression": compression}
    if "strict" in flags:
        body["StrictCompression"] = True

    def go() -> dict:
        c = site.client
        samples: list[list[float]] = []
        t0 = time.monotonic()
        r = c.post(f"/transfers/{route}", json=body)
        if r.status_code != 200:
            raise RunFailed(f"POST /transfers/{route}: HTTP {r.status_code}: {r.text[:300]}")
        job_id = r.json()["ID"]
        while True:
            j = c.get(f"/jobs/{job_id}").json()
            t = time.monotonic() - t0
            content = j.get("Content", {})
            samples.append([round(t, 4), j.get("Progress", 0) / 100, content.get("CompletedHttpQueries")])
            if j["State"] == "Success":
                break
            if j["State"] == "Failure":
                raise RunFailed(f"job {job_id} failed: {j.get('ErrorDescription')}: {j.get('ErrorDetails')}")
            if t > timeout or ABORT.is_set():
                c.post(f"/jobs/{job_id}/cancel", content=b"")
                raise RunFailed(f"job {job_id} not finished after {t:.0f} s ({j.get('Progress')}%)"
                                + (": interrupted" if ABORT.is_set() else ""))
            time.sleep(_poll_interval(t))
        return {"wall_s": t, "progress": samples, "job": {
            "id": job_id, "type": j.get("Type"), "effective_runtime_s": j.get("EffectiveRuntime"),
            "content": {k: content.get(k) for k in ("TotalInstances", "TotalSizeMB", "CompletedHttpQueries",
                                                    "UploadedSizeMB", "DownloadedSizeMB", "Codec")
                        if k in content}}}

    out = site.host.call(go)
    out["sender"], out["receiver"] = "daemon-a", "daemon-b"
    return out


def _vm_hwm(pid: int, comm: str | None) -> int:
    """VmHWM of ``pid`` in bytes if it is running ``comm`` now (0 otherwise: not exec'ed yet, gone)."""
    try:
        if comm is not None and Path(f"/proc/{pid}/comm").read_text().strip() != comm[:15]:
            return 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wait4(proc: subprocess.Popen, timeout: float, comm: str | None = None) -> tuple[int, float, int]:
    """Reaps ``proc`` (killing it after ``timeout``): (exit status, CPU s, peak RSS bytes).

    CPU comes from wait4(). The peak RSS does not: a child's ru_maxrss counts the memory of the
    Python process it was forked from (kept across exec), so VmHWM is sampled every 10 ms while
    the process runs ``comm`` (0 when ``comm`` is None: the caller knows better)."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        if comm is not None:
            peak = max(peak, _vm_hwm(proc.pid, comm))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline or ABORT.is_set():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pid, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise RunFailed(f"{proc.args[0]} did not finish within {timeout:g} s")
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime, peak


def _per_instance(bed: Testbed, manifest: StudyManifest, workdir: Path, timeout: float) -> dict:
    listing = workdir / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in manifest.paths()))
    url = f"http://{bed.b.addr}:{bed.site_b.port}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    err_path = workdir / "client.err"
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(bed.a.argv([sys.executable, "-m", "bench.systems", "post-instances", url,
                                            str(listing)]), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err_file, start_new_session=True, text=True)
    lines: list[str] = []

    def read() -> None:
        with proc.stdout:
            lines.extend(proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code, cpu, _ = _wait4(proc, timeout)
    finally:
        reader.join(5)
    err = err_path.read_text(errors="replace")
    start = end = None
    rss = 0
    samples, problems, total = [], [], manifest.total_bytes
    for line in lines:
        parts = line.split(" ", 1)
        if parts[0] == "start":
            start = float(parts[1])
        elif parts[0] == "done" and start is not None:
            t, done = parts[1].split()
            samples.append([round(float(t) - start, 4), int(done) / total, None])
        elif parts[0] == "end":
            info = json.loads(parts[1])
            end, problems, rss = info["t"], info["problems"], info["peak_rss_bytes"]
    if code != 0 or start is None or end is None:
        raise RunFailed(f"per-instance client exited with {code}: {err[-1500:]}")
    if problems:
        raise RunFailed(f"per-instance client: {len(problems)} failed request(s), e.g. {problems[0]}")
    return {"wall_s": end - start, "progress": [[0.0, 0.0, None], *samples], "sender": "client",
            "receiver": "daemon-b", "sender_usage": (cpu, rss)}


def _file_pieces(path: Path, piece: int = 1 << 20):
    with open(path, "rb") as f:
        while data := f.read(piece):
            yield data


def post_instances_main(url: str, listing: Path) -> int:
    """The per-instance client: POST every file, one after the other, on one connection."""
    paths = [Path(p) for p in listing.read_text().splitlines() if p]
    problems: list[str] = []
    done = 0
    with httpx.Client(base_url=url, timeout=600, trust_env=False,
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as c:
        print(f"start {time.monotonic():.6f}", flush=True)
        for p in paths:
            size = p.stat().st_size
            try:
                # Streamed with its Content-Length in 1 MiB pieces: a whole 100 MB body handed to
                # httpx costs seconds of CPU (its socket writes copy what is left each time).
                r = c.post("/instances", content=_file_pieces(p),
                           headers={"Content-Type": "application/dicom", "Content-Length": str(size)})
                if r.status_code != 200 or r.json().get("Status") not in ("Success", "AlreadyStored"):
                    problems.append(f"{p.name}: HTTP {r.status_code}: {r.text[:200]}")
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                problems.append(f"{p.name}: {type(e).__name__}: {e}")
            done += size
            print(f"done {time.monotonic():.6f} {done}", flush=True)
    end = time.monotonic()
    hwm = _vm_hwm(os.getpid(), None)     # our own peak (wait4's ru_maxrss would include the parent's)
    print("end " + json.dumps({"t": end, "problems": problems[:20], "peak_rss_bytes": hwm}), flush=True)
    return 0


# -- dcmtk

def dcmtk_config(manifest: StudyManifest, path: Path) -> str:
    """A storescu association profile: one presentation context per (SOP class, transfer
    syntax) of the study, proposing exactly the files' own syntax (no conversion)."""
    pairs = sorted({(f.SOPClassUID, f.TransferSyntaxUID) for f in manifest.files})
    if len(pairs) > 127:
        raise RunFailed(f"{len(pairs)} (SOP class, transfer syntax) pairs: more than a DICOM association allows")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Bench]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}" for n, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", "[Bench]", "PresentationContexts = Bench"]
    path.write_text("\n".join(lines) + "\n")
    return "Bench"


def _after_meta(path: Path) -> bytes:
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        raise ValueError(f"{path}: no DICOM preamble with a (0002,0000) group length")
    return data[144 + struct.unpack("<I", data[140:144])[0]:]


_source_digests: dict[str, dict[str, tuple[str, str, int]]] = {}


def _dataset_digests(manifest: StudyManifest) -> dict[str, tuple[str, str, int]]:
    """SOPInstanceUID -> (md5 of the data set after the file meta group, path, file size)."""
    key = str(manifest.root)
    if key not in _source_digests:
        _source_digests[key] = {f.SOPInstanceUID: (hashlib.md5(_after_meta(p)).hexdigest(), str(p), f.size)
                                for f, p in zip(manifest.files, manifest.paths())}
    return _source_digests[key]


def _same_dataset(received: Path, source: str) -> bool:
    """Element by element, by value (DCMTK may re-encode lengths, pad odd values, drop the
    trailing padding (FFFC,FFFC)); pydicom's Dataset == would compare raw file offsets."""
    import pydicom
    return _same_items(pydicom.dcmread(received), pydicom.dcmread(source))


def _same_items(a, b) -> bool:
    padding = 0xFFFCFFFC
    tags_a = set(a.keys()) - {padding}
    tags_b = set(b.keys()) - {padding}
    if tags_a != tags_b:
        return False
    for t in tags_a:
        ea, eb = a[t], b[t]
        if ea.VR == "SQ" or eb.VR == "SQ":
            va, vb = ea.value or [], eb.value or []
            if len(va) != len(vb) or not all(_same_items(x, y) for x, y in zip(va, vb)):
                return False
        elif ea.value != eb.value:
            va, vb = ea.value, eb.value
            if not (isinstance(va, bytes) and isinstance(vb, bytes) and va.rstrip(b"\0 ") == vb.rstrip(b"\0 ")):
                return False
    return True


def verify_received_files(manifest: StudyManifest, folder: Path) -> tuple[int, list[str], int]:
    """(verified source bytes, problems, byte-identical data sets) for storescp's folder."""
    import pydicom
    want = _dataset_digests(manifest)
    seen: set[str] = set()
    problems, good, identical = [], 0, 0
    for p in sorted(folder.iterdir()):
        try:
            uid = str(pydicom.filereader.read_file_meta_info(p).MediaStorageSOPInstanceUID)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{p.name}: unreadable: {e}")
            continue
        if uid not in want or uid in seen:
            problems.append(f"{p.name}: unexpected or duplicate SOP instance {uid}")
            continue
        seen.add(uid)
        md5, source, size = want[uid]
        if hashlib.md5(_after_meta(p)).hexdigest() == md5:
            identical += 1
            good += size
        elif _same_dataset(p, source):
            good += size
        else:
            problems.append(f"{p.name}: data set differs from {source}")
    missing = len(want) - len(seen)
    if missing:
        problems.append(f"{missing} instance(s) never arrived")
    return good, problems, identical


def _dcmtk(bed: Testbed, manifest: StudyManifest, workdir: Path, timeout: float) -> dict:
    out_dir = workdir / "storescp"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    profile = dcmtk_config(manifest, workdir / "storescu.cfg")
    port = 11112 if bed.link else free_port()
    env = {**os.environ, **DCMTK_ENV}
    with open(workdir / "storescp.log", "wb") as scp_log:
        scp = subprocess.Popen(bed.b.argv(["storescp", "+B", "+xa", "-dhl", "-aet", "STORESCP", "-od",
                                           str(out_dir), str(port)]), env=env, stdin=subprocess.DEVNULL,
                               stdout=scp_log, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[list[float]] = []
    stop = threading.Event()
    total = manifest.total_bytes
    try:
        deadline = time.monotonic() + 10
        while not bed.b.call(listening, port):
            if scp.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"storescp did not listen on {port}: {(workdir / 'storescp.log').read_text()[-500:]}")
            time.sleep(0.02)
        scp_cpu0, _ = _proc_cpu(scp.pid)
        _rss_reset(scp.pid)
        files = [str(p) for p in manifest.paths()]
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(0.1):
                try:
                    done = sum(e.stat().st_size for e in os.scandir(out_dir))
                except OSError:
                    continue
                samples.append([round(time.monotonic() - t0, 4), min(1.0, done / total), None])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with open(workdir / "storescu.log", "wb") as scu_log:
            scu = subprocess.Popen(bed.a.argv(["storescu", "-xf", str(workdir / "storescu.cfg"), profile,
                                               "-aet", "STORESCU", "-aec", "STORESCP", bed.b.addr, str(port),
                                               *files]), env=env, stdin=subprocess.DEVNULL, stdout=scu_log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
            code, cpu, rss = _wait4(scu, timeout, "storescu")
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        scp_cpu1, scp_rss = _proc_cpu(scp.pid)
        if code != 0:
            raise RunFailed(f"storescu exited with {code}: {(workdir / 'storescu.log').read_text()[-1500:]}")
    finally:
        stop.set()
        if scp.poll() is None:
            os.killpg(scp.pid, signal.SIGTERM)
        try:
            scp.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(scp.pid, signal.SIGKILL)
            scp.wait()
    samples.append([round(wall, 4), 1.0, None])
    return {"wall_s": wall, "progress": [[0.0, 0.0, None], *samples], "sender": "storescu",
            "receiver": "storescp", "sender_usage": (cpu, rss),
            "receiver_usage": (scp_cpu1 - scp_cpu0, scp_rss), "received_dir": out_dir}


def _proc_cpu(pid: int) -> tuple[float, int]:
    from bench.harness import process_usage
    return process_usage(pid)


# ------------------------------------------------------------------------------------ one run

def run_system(bed: Testbed, system: str, manifest: StudyManifest, ids: list[str], study_id: str,
               workdir: Path, timeout: float) -> dict:
    """One measured run of ``system``: empties b, transfers, verifies. Raises RunFailed."""
    workdir.mkdir(parents=True, exist_ok=True)
    bed.empty_b()
    daemons = {"daemon-a": bed.site_a, "daemon-b": bed.site_b}
    for site in daemons.values():
        _rss_reset(site.daemon.pid)
    before = {name: site.usage()[0] for name, site in daemons.items()}
    stats0 = bed.link.stats() if bed.link else None
    if system in ACCEL_SYSTEMS or system in OLD_SYSTEMS:
        out = _accel(bed, system, manifest, study_id, timeout)
    elif system == "per-instance-http":
        out = _per_instance(bed, manifest, workdir, timeout)
    elif system == "dcmtk-cstore":
        out = _dcmtk(bed, manifest, workdir, timeout)
    else:
        raise ValueError(f"unknown system {system!r}")
    stats1 = bed.link.stats() if bed.link else None
    usage = {}
    for name, site in daemons.items():
        cpu, rss = site.usage()
        usage[name] = {"cpu_s": cpu - before[name], "peak_rss_bytes": rss}
    if "sender_usage" in out:
        cpu, rss = out.pop("sender_usage")
        usage[out["sender"]] = {"cpu_s": cpu, "peak_rss_bytes": rss}
    if "receiver_usage" in out:
        cpu, rss = out.pop("receiver_usage")
        usage[out["receiver"]] = {"cpu_s": cpu, "peak_rss_bytes": rss}

    if system == "dcmtk-cstore":
        good, problems, identical = verify_received_files(manifest, out.pop("received_dir"))
        out["byte_identical_datasets"] = identical
        shutil.rmtree(workdir / "storescp", ignore_errors=True)
    else:
        good, problems = bed.verify_b(manifest, ids)
    out["usage"] = usage
    out["verified_bytes"] = good
    out["problems"] = problems[:20]
    out["link_stats"] = _stats_delta(stats0, stats1) if stats0 is not None else None
    if problems:
        raise RunFailed(f"verification failed ({len(problems)} problem(s)): {'; '.join(problems[:3])}", out)
    return out


_COUNTERS = ("rx_packets", "rx_bytes", "packets", "bytes", "dropped_loss", "dropped_loss_bytes",
             "dropped_queue", "dropped_queue_bytes", "dropped_other", "write_errors")


def _stats_delta(s0: dict, s1: dict) -> dict:
    out = {d: {k: s1[d][k] - s0[d][k] for k in _COUNTERS} for d in ("a_to_b", "b_to_a")}
    out["forwarder_cpu_s"] = s1["forwarder_cpu_s"] - s0["forwarder_cpu_s"]
    out["elapsed_s"] = s1["elapsed_s"] - s0["elapsed_s"]
    for d in ("a_to_b", "b_to_a"):
        out[d]["max_backlog_bytes"] = s1[d].get("max_backlog_bytes")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.systems")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("post-instances", help="POST every file listed in LISTING to URL/instances, sequentially")
    p.add_argument("url")
    p.add_argument("listing", type=Path)
    a = ap.parse_args(argv)
    return post_instances_main(a.url, a.listing)


if __name__ == "__main__":
    sys.exit(main())
