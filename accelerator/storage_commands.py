"""`accelerator storage stat | ls | verify | move`: the storage of a running daemon, for operators.

Like the other client commands, these talk to the daemon over its REST API (so nothing competes
with the daemon for its index or its files):

- `stat`: `GET /storage?count` (where new attachments go, each side, how many each holds);
- `ls`: one line per instance, `ID  SIZE  MD5  SIDES`, from `.../attachments/dicom/info`;
  without a filter every instance, paging through `GET /instances?since=&limit=` so that the
  output starts at once and memory stays flat;
- `verify`: `POST .../attachments/dicom/verify-md5` for each instance (Orthanc answers `{}` when
  the stored bytes match the index, a bare 400 when they do not), with a progress bar and a
  summary naming every failure; exit code 1 on any failure;
- `move`: `POST /move-storage` (the object-storage plugin's route) asynchronously, then with
  `--wait` the job is followed like `send --wait`.

An instance deleted while the command runs is skipped (it is not a failure).
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from accelerator.commands import Daemon, watch

LEVELS = ("patient", "study", "series", "instance")
PLURALS = {"patient": "patients", "study": "studies", "series": "series", "instance": "instances"}
TARGETS = ("file-system", "object-storage")
PAGE = 1000  # instance IDs asked per GET /instances

T = TypeVar("T")
R = TypeVar("R")


# -- talking to the daemon ---------------------------------------------------------------------

def request(daemon: Daemon, method: str, path: str, **kwargs) -> httpx.Response:
    """One request whose status the caller judges; only an unreachable daemon stops the command."""
    try:
        return daemon.client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise SystemExit(f"accelerator: cannot reach {daemon.client.base_url}: {exc}") from None


def reason(response: httpx.Response) -> str:
    """An error answer in a few words: Orthanc's Details or Message, else the HTTP status."""
    try:
        body = response.json()
        message = body.get("Details") or body.get("Message") or ""
    except ValueError:
        message = response.text.strip()
    return f"HTTP {response.status_code}" + (f": {message}" if message else "")


def filters(args) -> list[tuple[str, str]]:
    return [(level, ident) for level in LEVELS for ident in getattr(args, level, None) or ()]


def instance_ids(daemon: Daemon, chosen: list[tuple[str, str]], page: int = PAGE) -> Iterator[str]:
    """The instances below the chosen resources (each once), or every instance page by page."""
    if not chosen:
        yield from all_ids(daemon, "instances", page)
        return
    seen: set[str] = set()
    for level, ident in chosen:
        if level == "instance":
            found = [daemon.call("GET", f"/instances/{ident}")["ID"]]  # an unknown ID stops here
        else:
            found = [child["ID"] for child in daemon.call("GET", f"/{PLURALS[level]}/{ident}/instances")]
        for instance in found:
            if instance not in seen:
                seen.add(instance)
                yield instance


def all_ids(daemon: Daemon, plural: str, page: int = PAGE) -> Iterator[str]:
    """Every ID of a level, page by page (`since`/`limit`), so that the first arrive at once."""
    since = 0
    while True:
        ids = daemon.call("GET", f"/{plural}", params={"since": since, "limit": page})
        yield from ids
        if len(ids) < page:
            return
        since += len(ids)


def ordered_map(function: Callable[[T], R], items: Iterable[T], jobs: int) -> Iterator[tuple[T, R]]:
    """`(item, function(item))` in the order of `items`, `jobs` calls at a time; at most 2 x jobs
    results are held, so a listing of millions streams."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        window: deque[tuple[T, Future]] = deque()
        for item in items:
            window.append((item, pool.submit(function, item)))
            if len(window) >= 2 * max(1, jobs):
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()


# -- stat --------------------------------------------------------------------------------------

def stat(daemon: Daemon, *, count: bool, as_json: bool) -> int:
    summary = daemon.call("GET", "/storage", params={"count": ""} if count else None)
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    mode = summary.get("HybridMode", "Disabled")
    print(f"{'writes to:':<17}{summary.get('WriteTo')}" + (f" (HybridMode {mode})" if mode != "Disabled" else ""))
    print(f"{'compression:':<17}{'on' if summary.get('StorageCompression') else 'off'}")
    for kind, side in summary.get("Sides", {}).items():
        if "Root" in side:
            where = side["Root"]
        else:
            root = side.get("RootPath") or ""
            where = (f"{side.get('Backend', '?')}, bucket {side.get('Bucket', '?')!r} at {side.get('Endpoint', '?')}, "
                     f"{side.get('StorageStructure', 'flat')} layout" + (f", root {root!r}" if root else ""))
        held = f"  {side['Count']} attachment(s)" if "Count" in side else ""
        print(f"{kind + ':':<17}{where}{held}")
    if "CountInstances" in summary:
        print(f"{'index:':<17}{summary['CountInstances']} instance(s)")
    return 0


# -- ls ----------------------------------------------------------------------------------------

def ls(daemon: Daemon, chosen: list[tuple[str, str]], *, jobs: int) -> int:
    def info(instance: str) -> httpx.Response:
        return request(daemon, "GET", f"/instances/{instance}/attachments/dicom/info")

    errors = 0
    for instance, answer in ordered_map(info, instance_ids(daemon, chosen), jobs):
        if answer.status_code == 404:
            continue  # deleted since the listing
        if answer.status_code != 200:
            errors += 1
            print(f"{instance}  error: {reason(answer)}", flush=True)
            continue
        body = answer.json()
        sides = ",".join(body.get("Storage") or []) or "MISSING"
        print(f"{instance}  {body['UncompressedSize']:>12}  {body['UncompressedMD5']}  {sides}", flush=True)
    return 1 if errors else 0


# -- verify ------------------------------------------------------------------------------------

def verify(daemon: Daemon, chosen: list[tuple[str, str]], *, jobs: int, progress: bool) -> int:
    def check(instance: str) -> str | None:
        """None if the stored bytes match; "gone" if deleted meanwhile; else the failure."""
        answer = request(daemon, "POST", f"/instances/{instance}/attachments/dicom/verify-md5", content=b"")
        if answer.status_code == 200:
            return None
        if answer.status_code == 404:
            return "gone"
        if answer.status_code == 400 and not answer.content:
            return "the stored bytes do not match the MD5 of the index"
        return reason(answer)

    if chosen:
        ids: Iterable[str] = list(instance_ids(daemon, chosen))
        total = len(ids)
    else:  # every instance, streamed: the total is the index's count when we start
        ids, total = instance_ids(daemon, []), daemon.call("GET", "/statistics").get("CountInstances")
    ok, gone, failures = 0, 0, []
    with tqdm(total=total, unit="instance", disable=not progress, desc="verify") as bar:
        for instance, failure in ordered_map(check, ids, jobs):
            if failure is None:
                ok += 1
            elif failure == "gone":
                gone += 1
            else:
                failures.append((instance, failure))
                bar.set_postfix_str(f"{len(failures)} failed")
            bar.update(1)
    line = f"verified {ok + len(failures)} instance(s): {ok} ok, {len(failures)} failed"
    print(line + (f", {gone} deleted meanwhile" if gone else ""))
    for instance, failure in failures:
        print(f"FAILED {instance}: {failure}")
    return 1 if failures else 0


# -- move --------------------------------------------------------------------------------------

def move(daemon: Daemon, args) -> int:
    chosen = filters(args)
    if chosen and args.all:
        raise SystemExit("accelerator: --all moves everything: name no --patient/--study/--series/--instance")
    if args.all:
        resources = list(all_ids(daemon, "patients"))
    elif chosen:
        resources = [ident for _, ident in chosen]
    else:
        raise SystemExit("accelerator: name at least one --patient, --study, --series or --instance (or --all)")
    if not resources:
        print("nothing to move: the daemon holds no instance")
        return 0
    body = {"Resources": resources, "TargetStorage": args.to, "Asynchronous": True, "Priority": args.priority}
    answer = request(daemon, "POST", "/move-storage", json=body)
    if answer.status_code == 404 and not resources_unknown(answer):
        raise SystemExit("accelerator: this daemon has no POST /move-storage (as in Orthanc's plugin, "
                         "it exists with an object storage in HybridMode only: see `accelerator storage stat`)")
    if answer.status_code != 200:
        raise SystemExit(f"accelerator: POST /move-storage: {reason(answer)}")
    job_id = answer.json()["ID"]
    print(f"job {job_id}")
    if not args.wait:
        return 0
    job = watch(lambda: daemon.call("GET", f"/jobs/{job_id}"), progress=not args.no_progress,
                postfix=move_postfix)
    print(describe_move(job))
    return 0 if job["State"] == "Success" else 1


def resources_unknown(answer: httpx.Response) -> bool:
    """A 404 about the resources named (the route exists) rather than about the route itself."""
    try:
        return bool(answer.json().get("Details"))
    except ValueError:
        return False


def move_postfix(content: dict[str, Any]) -> str:
    return (f"{content.get('CompletedInstances', 0)}/{content.get('TotalInstances', '?')} instances, "
            f"{content.get('MovedBytes', 0) / 1048576:.1f} MB moved")


def describe_move(job: dict[str, Any]) -> str:
    content = job.get("Content", {})
    line = f"{job['ID']}  {job.get('Type', 'MoveStorage')}  {job['State']}  {job.get('Progress', 0)}%"
    if "TargetStorage" in content:
        line += f"  to {content['TargetStorage']}"
    if "TotalInstances" in content:
        line += f"  {content.get('MovedInstances', 0)} of {content['TotalInstances']} instance(s) moved"
    if job["State"] == "Failure":
        line += f"\n    {job.get('ErrorDescription', '')}: {job.get('ErrorDetails', '')}"
    return line


# -- wiring ------------------------------------------------------------------------------------

def add_arguments(commands, common: Sequence[Callable[[argparse.ArgumentParser], None]]) -> None:
    """`accelerator storage ACTION ...` on the CLI's sub-parser set; `common` adds --url & co."""
    storage = commands.add_parser(
        "storage", help="inspect, verify and move the attachments of a running daemon",
        description="Where a running daemon keeps its attachments, whether their bytes still match "
                    "the index, and moving them between the file system and object storage.")
    actions = storage.add_subparsers(dest="storage_action", metavar="ACTION", required=True)

    sub = actions.add_parser("stat", help="the configured storage and how many attachments each side holds")
    sub.add_argument("--no-count", action="store_true",
                     help="do not count the attachments of each side (counting lists the whole bucket)")
    sub.add_argument("--json", action="store_true", help="print the daemon's JSON answer as is")
    _common(sub, common)
    sub.set_defaults(run=lambda a: stat(_daemon(a), count=not a.no_count, as_json=a.json))

    sub = actions.add_parser("ls", help="one line per instance: ID, size, MD5 and the sides holding it",
                             description="Print `ID  SIZE  MD5  SIDES` for every instance (or those "
                                         "below the resources named); SIDES is MISSING when no "
                                         "storage holds the bytes.")
    _filters(sub, "list")
    sub.add_argument("--jobs", type=int, default=4, help="requests in flight (default: %(default)s)")
    _common(sub, common)
    sub.set_defaults(run=lambda a: ls(_daemon(a), filters(a), jobs=a.jobs))

    sub = actions.add_parser("verify", help="check every stored attachment against the MD5 of the index",
                             description="Ask the daemon to check the MD5 of each instance's stored "
                                         "bytes; exit code 1 if any fails.")
    _filters(sub, "verify")
    sub.add_argument("--jobs", type=int, default=2, help="verifications in flight (default: %(default)s)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(sub, common)
    sub.set_defaults(run=lambda a: verify(_daemon(a), filters(a), jobs=a.jobs, progress=not a.no_progress))

    sub = actions.add_parser("move", help="move resources between the file system and object storage",
                             description="Start a MoveStorage job (POST /move-storage) that copies each "
                                         "instance to the target side, checks its MD5 and only then "
                                         "removes it from the other side.")
    sub.add_argument("--to", required=True, choices=TARGETS, help="the side the attachments go to")
    _filters(sub, "move")
    sub.add_argument("--all", action="store_true", help="move every resource the daemon holds")
    sub.add_argument("--priority", type=int, default=0, help="job priority (default: %(default)s)")
    sub.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar with --wait")
    _common(sub, common)
    sub.set_defaults(run=lambda a: move(_daemon(a), a))


def _filters(parser: argparse.ArgumentParser, verb: str) -> None:
    for level in LEVELS:
        what = "this instance" if level == "instance" else f"the instances of this {level}"
        parser.add_argument(f"--{level}", action="append", metavar="ID",
                            help=f"{verb} {what} (Orthanc ID; repeatable)")


def _common(parser: argparse.ArgumentParser, common) -> None:
    for add in common:
        add(parser)


def _daemon(args) -> Daemon:
    return Daemon(args.url, (args.username, args.password) if args.username else None)
