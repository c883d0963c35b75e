"""`accelerator send | pull | jobs | peers`: talk to a running daemon over its REST API."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
from tqdm import tqdm

FINISHED = {"Success", "Failure"}
ACTIONS = ("pause", "resume", "cancel", "resubmit")


class Daemon:
    """A tiny client of our own REST API; errors become one readable line."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, transport=None):
        self.client = httpx.Client(base_url=url.rstrip("/"), auth=auth, timeout=60, transport=transport)

    def call(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SystemExit(f"accelerator: cannot reach {self.client.base_url}: {exc}") from None
        if response.status_code != 200:
            try:
                body = response.json()
                message = body.get("Details") or body.get("Message") or response.text
            except ValueError:
                message = response.text or response.reason_phrase
            raise SystemExit(f"accelerator: {method} {path}: HTTP {response.status_code}: {message}")
        return response.json() if response.content else {}

    def get_url(self, url: str) -> Any:
        """GET an absolute URL (a remote job of a bidirectional send)."""
        return self.call("GET", url)


def resources(args) -> list[dict[str, str]]:
    found = [{"Level": level.capitalize(), "ID": ident}
             for level in ("patient", "study", "series", "instance")
             for ident in getattr(args, level) or ()]
    if not found:
        raise SystemExit("accelerator: name at least one --patient, --study, --series or --instance")
    return found


def transfer(daemon: Daemon, route: str, args) -> int:
    """`send` or `pull`: create the job, print it, and with --wait follow it to the end."""
    body = {"Peer": args.peer, "Resources": resources(args), "Compression": args.compression,
            "Priority": args.priority}
    answer = daemon.call("POST", f"/transfers/{route}", json=body)
    if "RemoteJob" in answer:
        print(f"peer {answer['Peer']} pulls from us as job {answer['RemoteJob']} ({answer['URL']})")
        follow = (lambda: daemon.get_url(answer["URL"])) if args.wait else None
    else:
        print(f"job {answer['ID']}")
        follow = (lambda: daemon.call("GET", f"/jobs/{answer['ID']}")) if args.wait else None
    if follow is None:
        return 0
    job = watch(follow, progress=not args.no_progress)
    print(describe(job))
    return 0 if job["State"] == "Success" else 1


def transfer_postfix(content: dict) -> str:
    return f"{content.get('NetworkSpeedKBs', 0) / 1024:.1f} MB/s, {content.get('CompletedHttpQueries', 0)} buckets"


def watch(fetch, *, progress: bool = True, interval: float = 0.5, postfix=transfer_postfix) -> dict:
    """Poll a job until it finishes, with a progress bar showing the ETA and what `postfix` makes
    of the job's Content (a transfer's MB/s by default)."""
    bar = tqdm(total=100, unit="%", disable=not progress, bar_format=(
        "{desc} {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]"))
    try:
        while True:
            job = fetch()
            content = job.get("Content", {})
            bar.set_description_str(f"{job.get('Type', 'job')} {job['State']}")
            bar.set_postfix_str(postfix(content))
            bar.update(job.get("Progress", 0) - bar.n)
            if job["State"] in FINISHED:
                return job
            time.sleep(interval)
    finally:
        bar.close()


def describe(job: dict) -> str:
    content = job.get("Content", {})
    line = (f"{job['ID']}  {job['Type']:<12} {job['State']:<8} {job.get('Progress', 0):>3}%  "
            f"priority {job.get('Priority', 0)}  peer {content.get('Peer', '-')}  "
            f"{content.get('TotalInstances', 0)} instance(s), {content.get('TotalSizeMB', 0)} MB")
    if job["State"] == "Failure":
        line += f"\n    {job.get('ErrorDescription', '')}: {job.get('ErrorDetails', '')}"
    return line


def jobs(daemon: Daemon, job_id: str | None, action: str | None, watch_it: bool, progress: bool) -> int:
    if job_id is None:
        for job in daemon.call("GET", "/jobs", params={"expand": ""}):
            print(describe(job))
        return 0
    if action:
        daemon.call("POST", f"/jobs/{job_id}/{action}", content=b"")
    if watch_it:
        job = watch(lambda: daemon.call("GET", f"/jobs/{job_id}"), progress=progress)
    else:
        job = daemon.call("GET", f"/jobs/{job_id}")
    print(describe(job))
    return 0


def peers(daemon: Daemon) -> int:
    for name, status in sorted(daemon.call("GET", "/transfers/peers").items()):
        print(f"{name:<24} {status}")
    return 0


def add_arguments(commands, common: Sequence) -> None:
    """Declare the sub-commands on the CLI's sub-parser set; `common` adds --url/--username/..."""
    for route, help_text in (("send", "send resources to a peer (push, or the peer pulls from us)"),
                             ("pull", "pull resources from a peer")):
        sub = commands.add_parser(route, help=help_text)
        sub.add_argument("peer", help="peer name, as in OrthancPeers")
        for level in ("patient", "study", "series", "instance"):
            sub.add_argument(f"--{level}", action="append", metavar="ID", help=f"Orthanc ID of a {level}")
        sub.add_argument("--compression", choices=("gzip", "none"), default="gzip")
        sub.add_argument("--priority", type=int, default=0)
        sub.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar")
        sub.add_argument("--no-progress", action="store_true")
        for add in common:
            add(sub)
        sub.set_defaults(run=lambda a, route=route: transfer(_daemon(a), route, a))

    sub = commands.add_parser("jobs", help="list jobs, show one, or act on it")
    sub.add_argument("id", nargs="?", help="job ID")
    group = sub.add_mutually_exclusive_group()
    for action in ACTIONS:
        group.add_argument(f"--{action}", dest="action", action="store_const", const=action)
    sub.add_argument("--watch", action="store_true", help="follow the job to its end")
    sub.add_argument("--no-progress", action="store_true")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: jobs(_daemon(a), a.id, a.action, a.watch, not a.no_progress))

    sub = commands.add_parser("peers", help="show every peer and whether it runs the transfers protocol")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: peers(_daemon(a)))


def _daemon(args) -> Daemon:
    return Daemon(args.url, (args.username, args.password) if args.username else None)
