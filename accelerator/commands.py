"""`accelerator send | pull | find | jobs | peers`: talk to a running daemon over its REST API.

`send` and `pull` take, for each resource, an Orthanc ID or a DICOM identifier (PatientID,
StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) and resolve it before any job exists:
`send` on this daemon (`GET /{level}/{id}`, `POST /tools/lookup`), `pull` on the peer through
this daemon (`POST /transfers/remote/{peer}/lookup`, which uses the peer's credentials from the
daemon's configuration). Something unknown, ambiguous, or of a lower level than asked is refused
with the reason, and no job is created.

Routes of ours that the CLI uses beside Orthanc's and the plugin's (all under /transfers/remote):
`GET /transfers/remote` (every peer's state and, when disabled, why), `POST
/transfers/remote/{peer}/lookup`, `GET /transfers/remote/{peer}/jobs/{id}` (the job of a
bidirectional send, read by the daemon with the peer's credentials). Against a daemon without
them the CLI says what it cannot check and falls back to what the daemon has.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from tqdm import tqdm

FINISHED = {"Success", "Failure"}
ACTIONS = ("pause", "resume", "cancel", "resubmit")
LEVELS = ("patient", "study", "series", "instance")
_PLURAL = {"patient": "patients", "study": "studies", "series": "series", "instance": "instances"}
_TITLE = {level: level.capitalize() for level in LEVELS}
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


class Daemon:
    """A tiny client of our own REST API; errors become one readable line."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, transport=None):
        self.client = httpx.Client(base_url=url.rstrip("/"), auth=auth, timeout=60, transport=transport)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SystemExit(f"accelerator: cannot reach {self.client.base_url}: {exc}") from None

    def call(self, method: str, path: str, **kwargs) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code != 200:
            raise SystemExit(f"accelerator: {method} {path}: HTTP {response.status_code}: {error_text(response)}")
        return response.json() if response.content else {}

    def try_call(self, method: str, path: str, **kwargs) -> tuple[int, Any]:
        """(status, JSON body or None): for calls whose failure the caller handles."""
        response = self.request(method, path, **kwargs)
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        return response.status_code, body

    def get_url(self, url: str) -> Any:
        """GET an absolute URL (a remote job of a bidirectional send)."""
        return self.call("GET", url)


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("Details") or body.get("Message") or response.text)
    except (ValueError, AttributeError):
        return response.text or response.reason_phrase


def _details(body: Any) -> str:
    return str(body.get("Details") or body.get("Message") or "") if isinstance(body, dict) else ""


def warn(message: str) -> None:
    print(f"accelerator: {message}", file=sys.stderr)


# -- resolving what the user named -------------------------------------------------------------


class Unresolved(SystemExit):
    """A resource the user named that is unknown or ambiguous: no job is created."""


def _choose(level: str, value: str, matches: list[dict], where: str) -> list[dict[str, str]]:
    """The resources to transfer for `--{level} value`, from lookup answers [{"Type", "ID"}].

    A match at the level asked is taken; one of a higher level (a PatientID given to --study)
    is transferred whole at its own level; a lower one is refused, as are several matches at
    the level asked (a StudyInstanceUID stored under two PatientIDs): give the Orthanc ID."""
    rank = {_TITLE[lv]: i for i, lv in enumerate(LEVELS)}
    asked = LEVELS.index(level)
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for match in matches:
        kind, ident = str(match.get("Type", "")), str(match.get("ID", ""))
        if kind in rank and ident:
            seen[(kind, ident)] = {"Level": kind, "ID": ident}
    same = [r for (kind, _), r in seen.items() if rank[kind] == asked]
    higher = [r for (kind, _), r in seen.items() if rank[kind] < asked]
    lower = [r for (kind, _), r in seen.items() if rank[kind] > asked]
    if len(same) > 1:
        listed = ", ".join(r["ID"] for r in same)
        raise Unresolved(f"accelerator: {value!r} names {len(same)} {_PLURAL[level]} {where} ({listed}): "
                         f"give the Orthanc ID of the one to transfer")
    if same:
        return same
    if higher:
        return higher[:1]
    if lower:
        kinds = sorted({r["Level"].lower() for r in lower})
        raise Unresolved(f"accelerator: {value!r} is a {' and a '.join(kinds)} {where}, not a {level}: "
                         f"use --{kinds[0]}")
    raise Unresolved(f"accelerator: no {level} {value!r} {where} (nothing has that Orthanc ID, PatientID "
                     f"or Study/Series/SOP Instance UID)")


def resolve_local(daemon: Daemon, level: str, value: str) -> list[dict[str, str]]:
    """What `--{level} value` names on this daemon (for `send`)."""
    matches: list[dict] = []
    if ORTHANC_ID.fullmatch(value):
        for candidate in (level, *[lv for lv in LEVELS if lv != level]):
            status, _ = daemon.try_call("GET", f"/{_PLURAL[candidate]}/{value}")
            if status == 200:
                matches.append({"Type": _TITLE[candidate], "ID": value})
                break
    status, body = daemon.try_call("POST", "/tools/lookup", content=value.encode(),
                                   headers={"Content-Type": "text/plain"})
    if status == 200 and isinstance(body, list):
        matches += [m for m in body if isinstance(m, dict)]
    elif not matches and not ORTHANC_ID.fullmatch(value):
        raise Unresolved(f"accelerator: cannot look up {value!r}: the daemon answered POST /tools/lookup "
                         f"with HTTP {status} {_details(body)}; give an Orthanc ID instead".rstrip())
    return _choose(level, value, matches, "on this daemon")


def resolve_remote(daemon: Daemon, peer: str, level: str, value: str) -> list[dict[str, str]]:
    """What `--{level} value` names on the peer (for `pull`), asked through the daemon."""
    status, body = daemon.try_call("POST", f"/transfers/remote/{peer}/lookup", content=value.encode(),
                                   headers={"Content-Type": "text/plain"})
    if status == 200 and isinstance(body, list):
        return _choose(level, value, [m for m in body if isinstance(m, dict)], f"on peer {peer!r}")
    if status == 404 and "peer" in _details(body).lower():
        raise Unresolved(f"accelerator: {_details(body)}")
    if status == 404 and ORTHANC_ID.fullmatch(value):
        warn(f"this daemon cannot look up resources on peer {peer!r} (no POST /transfers/remote/"
             f"{peer}/lookup): {level} {value} is not checked before the job")
        return [{"Level": _TITLE[level], "ID": value}]
    raise Unresolved(f"accelerator: cannot look up {value!r} on peer {peer!r}: HTTP {status} "
                     f"{_details(body)}".rstrip() + ("; give the Orthanc ID" if status == 404 else ""))


def resources(args, resolve: Callable[[str, str], list[dict[str, str]]] | None = None) -> list[dict[str, str]]:
    """The Resources of a transfer: every --patient/--study/--series/--instance, resolved."""
    named = [(level, value) for level in LEVELS for value in getattr(args, level) or ()]
    if not named:
        raise SystemExit("accelerator: name at least one --patient, --study, --series or --instance")
    found: list[dict[str, str]] = []
    for level, value in named:
        if resolve is None:
            chosen = [{"Level": _TITLE[level], "ID": value}]
        else:
            chosen = resolve(level, value)
        for resource in chosen:
            if resource not in found:
                found.append(resource)
            if resource["ID"] != value or resource["Level"] != _TITLE[level]:
                print(f"{level} {value}: {resource['Level'].lower()} {resource['ID']}")
    return found


# -- send / pull -------------------------------------------------------------------------------


def transfer(daemon: Daemon, route: str, args) -> int:
    """`send` or `pull`: resolve the resources, create the job, print it, and with --wait follow
    it to the end (for a bidirectional send: the peer's job, read through the daemon)."""
    if route == "send":
        resolve = lambda level, value: resolve_local(daemon, level, value)  # noqa: E731
    else:
        resolve = lambda level, value: resolve_remote(daemon, args.peer, level, value)  # noqa: E731
    body = {"Peer": args.peer, "Resources": resources(args, resolve), "Compression": args.compression,
            "Priority": args.priority}
    answer = daemon.call("POST", f"/transfers/{route}", json=body)
    if "RemoteJob" in answer:
        print(f"peer {answer['Peer']} pulls from us as job {answer['RemoteJob']} ({answer['URL']})")
        follow = remote_follower(daemon, answer) if args.wait else None
    else:
        print(f"job {answer['ID']}")
        follow = (lambda: daemon.call("GET", f"/jobs/{answer['ID']}")) if args.wait else None
    if follow is None:
        return 0
    job = watch(follow, progress=not args.no_progress)
    print(describe(job))
    return 0 if job["State"] == "Success" else 1


def remote_follower(daemon: Daemon, answer: dict) -> Callable[[], dict]:
    """Fetch the remote job of a bidirectional send: through `GET /transfers/remote/{peer}/jobs/
    {id}`, where the daemon uses the peer's credentials from its configuration (the user needs
    no secret of the peer, and the peer need not be reachable from here). A daemon without that
    route: the job URL the peer gave, directly, without credentials (what older versions did)."""
    path = f"/transfers/remote/{answer['Peer']}/jobs/{answer['RemoteJob']}"
    direct = [False]

    def fetch() -> dict:
        if not direct[0]:
            status, body = daemon.try_call("GET", path)
            if status == 200 and isinstance(body, dict):
                return body
            if status != 404 or "peer" in _details(body).lower():
                raise SystemExit(f"accelerator: GET {path}: HTTP {status}: {_details(body)}")
            warn(f"this daemon cannot read the peer's job (no GET {path}): reading {answer['URL']} directly")
            direct[0] = True
        return daemon.get_url(answer["URL"])

    return fetch


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


# -- peers -------------------------------------------------------------------------------------


def peers(daemon: Daemon) -> int:
    """Every peer, its state, and for a disabled one why (`GET /transfers/remote`); a daemon
    without that route gives the states only (`GET /transfers/peers`)."""
    status, detailed = daemon.try_call("GET", "/transfers/remote")
    if status == 200 and isinstance(detailed, dict):
        for name, entry in sorted(detailed.items()):
            state = entry.get("State", "?") if isinstance(entry, dict) else str(entry)
            reason = entry.get("Reason", "") if isinstance(entry, dict) else ""
            print(f"{name:<24} {state:<13} {reason}".rstrip())
        return 0
    for name, state in sorted(daemon.call("GET", "/transfers/peers").items()):
        print(f"{name:<24} {state}")
    warn("this daemon does not say why a peer is disabled (no GET /transfers/remote)")
    return 0


# -- find --------------------------------------------------------------------------------------

_COUNTS = {"patient": "NumberOfPatientRelatedStudies", "study": "NumberOfStudyRelatedInstances",
           "series": "NumberOfSeriesRelatedInstances"}
_COUNTED = {"patient": "study(ies)", "study": "instance(s)", "series": "instance(s)"}


def find_query(args) -> dict[str, str]:
    """The `Query` of POST /tools/find from the options (Orthanc's wildcards and date ranges
    pass through as typed)."""
    query = {}
    for option, tag in (("patient_id", "PatientID"), ("patient_name", "PatientName"),
                        ("study_date", "StudyDate"), ("accession", "AccessionNumber"),
                        ("modality", "Modality"), ("study_uid", "StudyInstanceUID")):
        value = getattr(args, option, None)
        if value is not None:
            query[tag] = value
    if args.description is not None:
        if args.level == "patient":
            raise SystemExit("accelerator: --description searches studies or series: add --level study")
        query["SeriesDescription" if args.level in ("series", "instance") else "StudyDescription"] = args.description
    return query


def find(daemon: Daemon, args) -> int:
    """`accelerator find`: POST /tools/find, one line per resource with its ID first."""
    body: dict[str, Any] = {"Level": _TITLE[args.level], "Query": find_query(args), "Expand": True,
                            "Limit": args.limit}
    if args.level in _COUNTS:
        body["RequestedTags"] = [_COUNTS[args.level]]
    status, answer = daemon.try_call("POST", "/tools/find", json=body)
    if status == 400 and "RequestedTags" in body:  # a daemon that does not take them
        body.pop("RequestedTags")
        status, answer = daemon.try_call("POST", "/tools/find", json=body)
    if status != 200 or not isinstance(answer, list):
        raise SystemExit(f"accelerator: POST /tools/find: HTTP {status}: {_details(answer)}")
    for resource in answer:
        print(summary_line(args.level, resource))
    plural = _PLURAL[args.level] if len(answer) != 1 else args.level
    more = f" (the first {args.limit}: raise --limit for more)" if args.limit and len(answer) >= args.limit else ""
    print(f"{len(answer)} {plural}{more}", file=sys.stderr)
    return 0 if answer else 1


def summary_line(level: str, resource: dict) -> str:
    tags = resource.get("MainDicomTags") or {}
    patient = resource.get("PatientMainDicomTags") or {}
    requested = resource.get("RequestedTags") or {}
    ident = resource.get("ID", "?")
    if level == "patient":
        fields = [tags.get("PatientID", ""), tags.get("PatientName", ""), tags.get("PatientBirthDate", "")]
        count = requested.get(_COUNTS[level], len(resource.get("Studies") or []))
    elif level == "study":
        fields = [patient.get("PatientID", ""), patient.get("PatientName", ""), tags.get("StudyDate", ""),
                  tags.get("AccessionNumber", ""), tags.get("StudyDescription", "")]
        count = requested.get(_COUNTS[level])
    elif level == "series":
        fields = [tags.get("Modality", ""), tags.get("SeriesNumber", ""), tags.get("SeriesDescription", "")]
        count = requested.get(_COUNTS[level], len(resource.get("Instances") or []))
    else:
        fields = [tags.get("InstanceNumber", ""), tags.get("SOPInstanceUID", "")]
        count = None
    text = "  ".join(str(f) if f else "-" for f in fields)
    if count is not None:
        text += f"  {count} {_COUNTED[level]}"
    return f"{ident}  {text}"


# -- the sub-commands --------------------------------------------------------------------------


def add_arguments(commands, common: Sequence) -> None:
    """Declare the sub-commands on the CLI's sub-parser set; `common` adds --url/--username/..."""
    for route, help_text, where in (
            ("send", "send resources to a peer (push, or the peer pulls from us)", "on this daemon"),
            ("pull", "pull resources from a peer", "on the peer")):
        sub = commands.add_parser(route, help=help_text, description=(
            f"{help_text[0].upper()}{help_text[1:]}. Each resource is an Orthanc ID or a DICOM "
            f"identifier (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) looked up "
            f"{where} before the job is created: unknown or ambiguous ones are refused."))
        sub.add_argument("peer", help="peer name, as in OrthancPeers")
        for level, identifier in (("patient", "PatientID"), ("study", "StudyInstanceUID (or a PatientID: "
                                                                      "all the patient's studies)"),
                                  ("series", "SeriesInstanceUID"), ("instance", "SOPInstanceUID")):
            sub.add_argument(f"--{level}", action="append", metavar="ID",
                             help=f"{'an' if level == 'instance' else 'a'} {level}: its Orthanc ID or {identifier}; "
                                  f"repeat for several")
        sub.add_argument("--compression", choices=("gzip", "none"), default="gzip",
                         help="compression of the transferred buckets (default: %(default)s)")
        sub.add_argument("--priority", type=int, default=0,
                         help="job priority, higher runs first (default: %(default)s)")
        sub.add_argument("--wait", action="store_true",
                         help="follow the job to its end with a progress bar (for a peer that pulls from "
                              "us: the peer's job, read by the daemon with the peer's credentials)")
        sub.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
        for add in common:
            add(sub)
        sub.set_defaults(run=lambda a, route=route: transfer(_daemon(a), route, a))

    sub = commands.add_parser("find", help="search the daemon by DICOM tags and print the IDs found",
                              description="Search with POST /tools/find. Values take Orthanc's wildcards "
                                          "(* and ?) and dates take ranges (20240101-20241231, -20240101).")
    sub.add_argument("--level", choices=LEVELS, default="study",
                     help="what to list (default: %(default)s)")
    sub.add_argument("--patient-id", metavar="ID", help="PatientID")
    sub.add_argument("--patient-name", metavar="NAME", help="PatientName, e.g. 'DOE^*'")
    sub.add_argument("--study-date", metavar="DATE", help="StudyDate: YYYYMMDD or a range FROM-TO")
    sub.add_argument("--accession", metavar="NUMBER", help="AccessionNumber")
    sub.add_argument("--description", metavar="TEXT",
                     help="StudyDescription (SeriesDescription with --level series or instance)")
    sub.add_argument("--modality", metavar="MODALITY", help="Modality of a series, e.g. CT")
    sub.add_argument("--study-uid", metavar="UID", help="StudyInstanceUID")
    sub.add_argument("--limit", type=int, default=100,
                     help="at most this many answers, 0 for all (default: %(default)s)")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: find(_daemon(a), a))

    sub = commands.add_parser("jobs", help="list jobs, show one, or act on it")
    sub.add_argument("id", nargs="?", help="job ID (none: list every job)")
    group = sub.add_mutually_exclusive_group()
    for action in ACTIONS:
        group.add_argument(f"--{action}", dest="action", action="store_const", const=action,
                           help=f"{action} the job")
    sub.add_argument("--watch", action="store_true", help="follow the job to its end")
    sub.add_argument("--no-progress", action="store_true", help="with --watch: no progress bar")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: jobs(_daemon(a), a.id, a.action, a.watch, not a.no_progress))

    sub = commands.add_parser("peers", help="show every peer, whether it runs the transfers protocol, "
                                            "and why not")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: peers(_daemon(a)))


def _daemon(args) -> Daemon:
    return Daemon(args.url, (args.username, args.password) if args.username else None)
