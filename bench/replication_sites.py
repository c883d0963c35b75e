"""The two sites of the replication scenario (bench/replication.py) and its measured systems.

Each site's servers run in its host's network namespace: Orthancs are started from the host's
NsThread (a process forked from a thread inherits that thread's namespace, and start_orthanc's
readiness check then talks to that namespace's loopback), daemons with ``ip netns exec`` as in
bench/systems.py. Every HTTP client is created and used in the thread of the site it belongs to,
so A-GA and GB-B traffic stays on the sites' loopbacks and only site-to-site traffic crosses the
emulated link.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from bench.datasets import StudyManifest
from bench.harness import free_port
from bench.netns import NsThread
from bench.orthanc import OrthancServer, start_orthanc
from bench.systems import ABORT, Host, RunFailed, Site, _poll_interval, _stats_delta
from protocol import codecs

SYSTEMS = ("replicate-gzip", "replicate-negotiated", "sequential-copy")
BUCKET = 4 << 20     # bytes gzipped at once for the study's reference gzip ratio


def gzip_ratio(manifest: StudyManifest) -> float:
    """DICOM bytes / gzip bytes of the study, compressed as the daemons compress a bucket (their
    gzip level, one member per ~4 MiB of whole files): the ratio of "the gzip limit"."""
    raw = packed = 0
    batch: list[bytes] = []
    for path in [*manifest.paths(), None]:
        if path is not None:
            batch.append(path.read_bytes())
        if batch and (path is None or sum(map(len, batch)) >= BUCKET):
            raw += sum(map(len, batch))
            packed += len(codecs.encode_parts(batch, "gzip"))
            batch = []
    return raw / packed


class Sites:
    """Orthanc A (with the study) at site a, empty Orthanc B at site b; gateways started per run."""

    def __init__(self, workdir: Path, link, manifest: StudyManifest):
        self.workdir, self.link, self.manifest = Path(workdir), link, manifest
        ns_a, ns_b = (link.ns_a, link.ns_b) if link else (None, None)
        self.addr_b = link.addr_b if link else "127.0.0.1"
        self.a = Host("a", ns_a, link.addr_a if link else "127.0.0.1", NsThread(ns_a, "site-a"))
        self.b = Host("b", ns_b, self.addr_b, NsThread(ns_b, "site-b"))
        self.orthanc_a: OrthancServer | None = None
        self.orthanc_b: OrthancServer | None = None
        self.ids = [f.orthanc_ids()["instance"] for f in manifest.files]
        self.upload_s = 0.0
        self._count = 0

    def start(self) -> None:
        # B takes POST /instances from site a (the sequential copy): remote access on.
        self.orthanc_a = self.a.call(start_orthanc, self.workdir / "orthanc-a", name="a")
        self.orthanc_b = self.b.call(start_orthanc, self.workdir / "orthanc-b", name="b",
                                     extra={"RemoteAccessAllowed": True})
        from bench.ingest import upload_all
        t = time.perf_counter()
        res = self.a.call(lambda: asyncio.run(upload_all(self.orthanc_a.url, self.manifest, 4, None)))
        self.upload_s = time.perf_counter() - t
        if res["problems"]:
            raise RunFailed("upload to A failed: " + "; ".join(res["problems"][:3]))
        _, problems = self.a.call(self._md5s, self.orthanc_a)
        if problems:
            raise RunFailed("A does not hold the study as generated: " + "; ".join(problems[:3]))

    def stop(self) -> None:
        for host, server in ((self.b, self.orthanc_b), (self.a, self.orthanc_a)):
            if server is not None:
                host.call(server.stop)
        for host in (self.a, self.b):
            host.thread.close()

    # -- per run

    def measure(self, system: str, timeout: float) -> dict:
        """One run of ``system`` on an emptied B, verified on B; raises RunFailed."""
        self.b.call(self._empty_b)
        gateways = self._gateways(system) if system.startswith("replicate-") else None
        try:
            before = {k: s.usage()[0] for k, s in (gateways or {}).items()}
            stats0 = self.link.stats() if self.link else None
            if gateways:
                out = self.a.call(self._replicate, gateways["daemon-a"], timeout)
            else:
                out = self.a.call(self._sequential, timeout)
            stats1 = self.link.stats() if self.link else None
            out["usage"] = {k: {"cpu_s": s.usage()[0] - before[k], "peak_rss_bytes": s.usage()[1]}
                            for k, s in (gateways or {}).items()}
        finally:
            for site in (gateways or {}).values():
                site.stop()
        out["link_stats"] = _stats_delta(stats0, stats1) if stats0 is not None else None
        good, problems = self.b.call(self._md5s, self.orthanc_b)
        out["verified_bytes"], out["problems"] = good, problems[:20]
        if problems:
            raise RunFailed(f"B verification failed ({len(problems)} problem(s)): {'; '.join(problems[:3])}", out)
        return out

    def _gateways(self, system: str) -> dict[str, Site]:
        """Fresh GA (-> A, peer gb) and GB (-> B, KeepCopies false) on empty storage."""
        self._count += 1
        bind = "0.0.0.0" if self.link else "127.0.0.1"
        port_a, port_b = free_port(), free_port()
        while port_b == port_a:
            port_b = free_port()
        common = {"HttpBindAddress": bind, "RemoteAccessAllowed": True, "AuthenticationEnabled": False}
        gb = Site(self.b, {**common, "Name": "gb", "HttpPort": port_b,
                           "Gateway": {"Url": self.orthanc_b.url, "KeepCopies": False}},
                  self.workdir / f"gw-{self._count}" / "gb")
        cfg_a = {**common, "Name": "ga", "HttpPort": port_a, "Gateway": {"Url": self.orthanc_a.url},
                 "OrthancPeers": {"gb": [f"http://{self.addr_b}:{port_b}/"]}}
        if system == "replicate-gzip":
            cfg_a["Transfers"] = {"NegotiatedCodecs": False}    # gzip on the wire, nothing better
        ga = Site(self.a, cfg_a, self.workdir / f"gw-{self._count}" / "ga")
        started: list[Site] = []
        try:
            for site in (gb, ga):
                site.start()
                started.append(site)
        except BaseException:
            for site in started:
                site.stop()
            raise
        return {"daemon-a": ga, "daemon-b": gb}

    def _replicate(self, ga: Site, timeout: float) -> dict:
        c = ga.client
        body = {"Source": self.orthanc_a.url, "Target": "gb", "Compression": "gzip"}
        t0 = time.monotonic()
        r = c.post("/replicate", json=body)
        if r.status_code != 200:
            raise RunFailed(f"POST /replicate: HTTP {r.status_code}: {r.text[:300]}")
        job_id = r.json()["ID"]
        phases: list[list] = []     # [t, phase] at each change seen by the polls: where time goes
        while True:
            j = c.get(f"/jobs/{job_id}").json()
            t = time.monotonic() - t0
            phase = j.get("Content", {}).get("Phase")
            if not phases or phases[-1][1] != phase:
                phases.append([round(t, 3), phase])
            if j["State"] == "Success":
                break
            if j["State"] == "Failure":
                raise RunFailed(f"replicate job failed: {j.get('ErrorDetails')}: {str(j.get('Content'))[:500]}")
            if t > timeout or ABORT.is_set():
                c.post(f"/jobs/{job_id}/cancel", content=b"")
                raise RunFailed(f"replicate job not finished after {t:.0f} s ({j.get('Progress')}%)")
            time.sleep(_poll_interval(t))
        content = j.get("Content", {})
        n = len(self.ids)
        if (content.get("Copied"), content.get("Verified"), content.get("Failed")) != (n, n, 0):
            raise RunFailed(f"replicate job Content is not {n} copied and verified: {str(content)[:500]}")
        return {"wall_s": t, "job": {"id": job_id, "content": content, "phases": phases}}

    def _sequential(self, timeout: float) -> dict:
        """Replicate.py's way: list A's instances, then GET each file from A and POST it to B,
        one at a time (client at site a, B across the link)."""
        b_url = f"http://{self.addr_b}:{self.orthanc_b.url.rsplit(':', 1)[1]}"
        with httpx.Client(base_url=self.orthanc_a.url, timeout=120, trust_env=False) as src, \
                httpx.Client(base_url=b_url, timeout=120, trust_env=False) as dst:
            t0 = time.monotonic()
            ids = src.get("/instances").json()
            for iid in ids:
                if time.monotonic() - t0 > timeout or ABORT.is_set():
                    raise RunFailed(f"sequential copy not finished after {timeout:.0f} s")
                f = src.get(f"/instances/{iid}/file")
                if f.status_code != 200:
                    raise RunFailed(f"GET A/instances/{iid}/file: HTTP {f.status_code}")
                r = dst.post("/instances", content=f.content, headers={"Content-Type": "application/dicom"})
                if r.status_code != 200:
                    raise RunFailed(f"POST B/instances: HTTP {r.status_code}: {r.text[:200]}")
            return {"wall_s": time.monotonic() - t0, "requests": 1 + 2 * len(ids)}

    # -- checks (each in the thread of the site it looks at)

    def _empty_b(self) -> None:
        with self.orthanc_b.client(trust_env=False) as c:
            for patient in c.get("/patients").json():
                c.delete(f"/patients/{patient}")
            left = c.get("/statistics").json()["CountInstances"]
        if left:
            raise RunFailed(f"B still holds {left} instances after deleting every patient")

    def _md5s(self, server: OrthancServer) -> tuple[int, list[str]]:
        """(verified bytes, problems): ``server`` holds exactly the study, every MD5 as generated
        (A's are checked against the same MD5s at the start: B's equal to A's)."""
        problems, good = [], 0
        with server.client(trust_env=False) as c:
            count = c.get("/statistics").json()["CountInstances"]
            if count != len(self.ids):
                problems.append(f"{count} instances, expected {len(self.ids)}")
            for f, iid in zip(self.manifest.files, self.ids):
                r = c.get(f"/instances/{iid}/attachments/dicom/md5")
                if r.status_code != 200:
                    problems.append(f"md5 of {iid}: HTTP {r.status_code}")
                elif r.text.strip().strip('"') != f.md5:
                    problems.append(f"{iid}: MD5 {r.text.strip()} != {f.md5}")
                else:
                    good += f.size
        return good, problems
