"""Orthanc's operations routes: the changes log, the clock, UIDs, the log level, the (empty)
modalities and the Prometheus metrics. As Orthanc 1.12 answers them (OrthancRestChanges.cpp,
OrthancRestSystem.cpp, OrthancRestModalities.cpp, ServerEnumerations.h):

- `GET /changes?since=&limit=` (default 0 and 100) or `?last`: `{"Changes": [{ChangeType, Date,
  ID, Path, ResourceType, Seq}], "Done", "Last"}`. Like Orthanc, an argument that does not parse
  resets both to their defaults (no 400), `Done` says whether the answer reaches the end of the
  log, and `Last` is the Seq of the last entry answered, or the last Seq ever given when none is.
  The entries are those Orthanc writes for what we do (accelerator.store.index): NewInstance,
  NewSeries, NewStudy, NewPatient at ingest, and StableSeries/StableStudy/StablePatient
  `StableAge` (60 s) after a resource's last instance. Orthanc writes no `Deleted` entry (it only
  tells plugins) and the entries of a deleted resource leave the log with it; so here. One answer
  holds at most MAX_CHANGES_ANSWERED entries (a larger limit is cut, with `Done: false`).
- `DELETE /changes`: empties the log (Seq goes on), answers an empty text/plain body.
- `/tools/now`, `/tools/now-local`: `YYYYMMDDTHHMMSS` in UTC / local time, text/plain.
- `/tools/generate-uid?level=patient|study|series|instance`: a UUID for a patient, a DICOM UID
  under DCMTK's root for the other levels (as Orthanc's FromDcmtkBridge::GenerateUniqueIdentifier);
  another level, or none, is a 404 (Orthanc answers nothing, hence its 404).
- `GET /tools/log-level`: `default`, `verbose` or `trace`; `PUT` one of them (anything else: 400
  Parameter out of range, 3) answers an empty body. `default` is the daemon's usual INFO log,
  `verbose` adds our DEBUG messages, `trace` also the HTTP client's.
- `GET /modalities` (`[]`, or `{}` with `expand`): this daemon speaks no DIMSE.
- `GET /tools/metrics-prometheus`: the Prometheus text format (accelerator.metrics).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator import metrics
from accelerator.api.core import route
from accelerator.api.http import json_answer, read_body
from accelerator.jobs import move_storage
from accelerator.store.index import CHANGE_TYPES, Change
from accelerator.transfers import pull, push, store_peer
from protocol.errors import ParameterOutOfRange, UnknownResource

DEFAULT_LIMIT = 100  # Orthanc's
MAX_CHANGES_ANSWERED = 10_000
_INT64 = 2**63
_UINT32 = 2**32

# DCMTK's roots (dcmtk/dcmdata/dcuid.h: SITE_{STUDY,SERIES,INSTANCE}_UID_ROOT), which Orthanc uses.
_UID_ROOTS = {"study": "1.2.276.0.7230010.3.1.2", "series": "1.2.276.0.7230010.3.1.3",
              "instance": "1.2.276.0.7230010.3.1.4"}

JOB_TYPES = tuple(sorted((pull.JOB_TYPE, push.JOB_TYPE, move_storage.JOB_TYPE, store_peer.JOB_TYPE)))
VERBOSITIES = ("default", "verbose", "trace")
_OUR_LOGGERS = ("accelerator", "protocol")
_CLIENT_LOGGERS = ("httpx", "httpcore")


def _text(value: str) -> Response:
    return Response(value, media_type="text/plain")


# -- changes ---------------------------------------------------------------------------------

def _since_and_limit(request: Request) -> tuple[int, int]:
    """Orthanc's GetSinceAndLimit: boost::lexical_cast<int64_t> and <unsigned int>; on a failure
    both fall back to their defaults. (lexical_cast<unsigned int> takes "-1" as 4294967295.)"""
    raw_since = request.query_params.get("since", "0")
    raw_limit = request.query_params.get("limit", str(DEFAULT_LIMIT))
    try:
        since = _parse_int(raw_since)
        if not -_INT64 <= since < _INT64:
            raise ValueError
        limit = _parse_int(raw_limit)
        if not -_UINT32 < limit < _UINT32:
            raise ValueError
    except ValueError:
        return 0, DEFAULT_LIMIT
    return since, limit % _UINT32


def _parse_int(text: str) -> int:
    digits = text[1:] if text[:1] in ("-", "+") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
        raise ValueError(text)
    return int(text)


def _change_json(change: Change) -> dict[str, Any]:
    return {
        "ChangeType": CHANGE_TYPES.get(change.change_type, str(change.change_type)),
        "Date": change.date,
        "ID": change.public_id,
        "Path": f"/{change.level.plural}/{change.public_id}",
        "ResourceType": change.level.title,
        "Seq": change.seq,
    }


async def get_changes(request: Request) -> Response:
    index = request.app.state.store.index
    if "last" in request.query_params:
        entries, last = await to_thread.run_sync(index.last_change)
        done = True
    else:
        since, limit = _since_and_limit(request)
        entries, done, last = await to_thread.run_sync(index.changes, since, min(limit, MAX_CHANGES_ANSWERED))
    return json_answer({"Changes": [_change_json(c) for c in entries], "Done": done, "Last": last})


async def delete_changes(request: Request) -> Response:
    await to_thread.run_sync(request.app.state.store.index.clear_changes)
    return _text("")


# -- tools -----------------------------------------------------------------------------------

async def get_now(request: Request) -> Response:
    return _text(time.strftime("%Y%m%dT%H%M%S", time.gmtime()))


async def get_now_local(request: Request) -> Response:
    return _text(time.strftime("%Y%m%dT%H%M%S", time.localtime()))


def generate_uid(level: str) -> str:
    if level == "patient":
        return str(uuid.uuid4())  # a PatientID (LO, 64 characters at most), as Orthanc
    root = _UID_ROOTS.get(level)
    if root is None:
        raise UnknownResource(f"Unknown level {level!r}: use patient, study, series or instance")
    return f"{root}.{uuid.uuid4().int}"  # at most 63 characters, no component with a leading 0


async def get_generate_uid(request: Request) -> Response:
    return _text(generate_uid(request.query_params.get("level", "")))


def current_verbosity() -> str:
    if logging.getLogger(_OUR_LOGGERS[0]).getEffectiveLevel() > logging.DEBUG:
        return "default"
    return "trace" if logging.getLogger(_CLIENT_LOGGERS[0]).getEffectiveLevel() <= logging.DEBUG else "verbose"


def set_verbosity(verbosity: str) -> None:
    if verbosity not in VERBOSITIES:
        raise ParameterOutOfRange(f'Verbosity can be "default", "verbose" or "trace": {verbosity}')
    ours = logging.INFO if verbosity == "default" else logging.DEBUG
    client = logging.DEBUG if verbosity == "trace" else logging.WARNING
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(client)
    logging.getLogger(__name__).warning("REST API call has switched the log level to: %s", verbosity)


async def get_log_level(request: Request) -> Response:
    return _text(current_verbosity())


async def put_log_level(request: Request) -> Response:
    body = await read_body(request, 1024)
    set_verbosity(body.decode("utf-8", "replace"))
    return _text("")


async def get_modalities(request: Request) -> Response:
    return json_answer({} if "expand" in request.query_params else [])


# -- metrics ---------------------------------------------------------------------------------

async def get_metrics(request: Request) -> Response:
    state = request.app.state
    jobs = [(job["Type"], job["State"]) for job in state.jobs.all()]  # in the event loop, the engine's

    def snapshot() -> metrics.Snapshot:
        return metrics.Snapshot(
            statistics=state.store.statistics(),
            jobs=jobs,
            max_push_transactions=state.receiver.max_transactions,
            active_push_transactions=len(state.receiver.ids()),
            last_change=state.store.index.last_change_seq(),
            started=metrics.STARTED,
            job_types=JOB_TYPES,
        )

    body = metrics.render(await to_thread.run_sync(snapshot))
    return Response(body, media_type=metrics.CONTENT_TYPE)


def routes() -> list[Route]:
    return [
        route("/changes", GET=get_changes, DELETE=delete_changes),
        route("/tools/now", GET=get_now),
        route("/tools/now-local", GET=get_now_local),
        route("/tools/generate-uid", GET=get_generate_uid),
        route("/tools/log-level", GET=get_log_level, PUT=put_log_level),
        route("/modalities", GET=get_modalities),
        route("/tools/metrics-prometheus", GET=get_metrics),
    ]
