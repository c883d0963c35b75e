"""`accelerator replicate SOURCE TARGET`: a Replicate job on the daemon, followed to its end with
a progress bar (instances, MB/s, time left), then a report: copied, skipped, failed with reasons.

A side is `self` (the daemon's store), the URL of a plain Orthanc, the name of a peer of the
daemon, or an Orthanc storage folder (source only; a path on the daemon's machine).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from accelerator.commands import Daemon, _daemon, watch

FAILED_PRINTED = 20


def side(text: str, username: str | None, password: str | None) -> object:
    """A side as the daemon takes it; credentials go with a URL."""
    if text.startswith(("http://", "https://")) and username:
        return {"Type": "Orthanc", "Url": text, "Username": username, "Password": password or ""}
    if os.path.isdir(text):  # a storage folder: the daemon runs elsewhere than this shell
        return {"Type": "Folder", "Path": os.path.abspath(text)}
    return text


def body(args) -> dict:
    selection = dict(json.loads(args.query)) if args.query else {}
    if args.patient:
        selection["PatientID"] = "\\".join(args.patient)
    if args.study:
        selection["StudyInstanceUID"] = "\\".join(args.study)
    if args.since:
        selection["StudyDate"] = f"{args.since.replace('-', '')}-"
    return {"Source": side(args.source, args.source_username, args.source_password),
            "Target": side(args.target, args.target_username, args.target_password),
            "Selection": selection, "Follow": args.follow, "Compression": args.compression,
            "Priority": args.priority}


def postfix(content: dict) -> str:
    done = content.get("Copied", 0) + content.get("Skipped", 0) + content.get("Failed", 0)
    return (f"{content.get('Phase', '')}: {done}/{content.get('Instances', '?')} instances, "
            f"{content.get('SpeedMBs', 0):.1f} MB/s")


def report(job: dict) -> str:
    content = job.get("Content", {})
    lines = [f"replication {job['ID']}: {job['State']}",
             f"  {content.get('Source', '?')} -> {content.get('Target', '?')}",
             f"  {content.get('Instances', 0)} instances ({content.get('TotalSizeMB', 0)} MB): "
             f"{content.get('Copied', 0)} copied ({content.get('CopiedSizeMB', 0)} MB), "
             f"{content.get('Skipped', 0)} skipped (the target held them), {content.get('Failed', 0)} failed"]
    if "Verified" in content:
        lines.append(f"  checked on the target by MD5: {content['Verified']}")
    if "Levels" in content and "TargetLevels" in content:
        ours, theirs = content["Levels"], content["TargetLevels"]
        lines.append("  per level, source / target: " + ", ".join(
            f"{name.lower()} {ours.get(name)} / {theirs.get(name)}" for name in ours))
    for item in content.get("FailedInstances", [])[:FAILED_PRINTED]:
        lines.append(f"  failed {item['ID']}: {item['Reason']}")
    if content.get("Failed", 0) > FAILED_PRINTED:
        lines.append(f"  ... and {content['Failed'] - FAILED_PRINTED} more (GET /jobs/{job['ID']})")
    if job["State"] == "Failure" and not content.get("Failed"):
        lines.append(f"  {job.get('ErrorDescription', '')}: {job.get('ErrorDetails', '')}")
    return "\n".join(lines)


def replicate(daemon: Daemon, args) -> int:
    answer = daemon.call("POST", "/replicate", json=body(args))
    print(f"job {answer['ID']}")
    if args.detach:
        return 0
    job = watch(lambda: daemon.call("GET", f"/jobs/{answer['ID']}"), progress=not args.no_progress,
                postfix=postfix)
    print(report(job))
    return 0 if job["State"] == "Success" else 1


def add_arguments(commands, common: Sequence) -> None:
    sub = commands.add_parser(
        "replicate", help="copy one Orthanc (or peer, folder, this daemon) to another, verified and resumable",
        description="Copy every selected instance from SOURCE to TARGET as a job of the daemon: what the "
                    "target holds with the same MD5 is skipped, every instance is checked by MD5 at the "
                    "end, and the job resumes where it stopped (pause, restart). Each side is 'self', the "
                    "URL of a plain Orthanc, a peer of the daemon, or (source only) an Orthanc storage "
                    "folder read while that Orthanc is stopped.")
    sub.add_argument("source", help="self | http(s)://orthanc | peer name | storage folder")
    sub.add_argument("target", help="self | http(s)://orthanc | peer name")
    sub.add_argument("--patient", action="append", metavar="PATIENTID", help="only this patient; repeat for several")
    sub.add_argument("--study", action="append", metavar="UID", help="only this StudyInstanceUID; repeat")
    sub.add_argument("--since", metavar="DATE", help="only studies of this StudyDate or later (YYYYMMDD)")
    sub.add_argument("--query", metavar="JSON", help='more constraints, a /tools/find Query: \'{"Modality": "CT"}\'')
    sub.add_argument("--follow", action="store_true", help="then keep the target in sync from the source's /changes")
    sub.add_argument("--compression", choices=("gzip", "none"), default="gzip",
                     help="of the buckets between two sites (default: %(default)s)")
    sub.add_argument("--priority", type=int, default=0, help="job priority (default: %(default)s)")
    for role in ("source", "target"):
        sub.add_argument(f"--{role}-username", help=f"user of a {role} URL (default: that of a peer with the same URL)")
        sub.add_argument(f"--{role}-password", help=f"password of a {role} URL")
    sub.add_argument("--detach", action="store_true", help="print the job ID and return at once")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    for add in common:
        add(sub)
    sub.set_defaults(run=lambda a: replicate(_daemon(a), a))
