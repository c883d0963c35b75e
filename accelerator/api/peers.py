"""The peers: `GET /transfers/peers` (the plugin's detection, spec 3.1, 10) and Orthanc's own
`/peers` routes (OrthancServer/Sources/OrthancRestApi/OrthancRestModalities.cpp, 1.12):

- `GET /peers`: the names, sorted (Orthanc keeps them in a std::set); `?expand`: each peer as
  `WebServiceParameters::FormatPublic` shows it (Url; Username with a null Password; the
  CertificateFile with null key and key password; Pkcs11; the *names* of the HttpHeaders;
  Timeout; the user properties such as RemoteSelf), as in the wire sample 01/0011;
- `GET /peers/{name}`: the operations (`RestApi::AutoListChildren`), 404 for an unknown peer;
- `GET /peers/{name}/configuration`: FormatPublic of that peer;
- `GET /peers/{name}/system`: the peer's own `GET /system`, answered verbatim;
- `POST /peers/{name}/store`: Orthanc's body (an ID as raw text or a JSON string, an array of
  IDs, or an object with `Resources` and the options `Compress`, `Transcode`, `Permissive`,
  `Synchronous`/`Asynchronous`, `Priority`), synchronous by default (answers the job's Content),
  `{"ID", "Path"}` when asynchronous. To a peer that speaks the transfers protocol (probed with
  `GET /plugins`), this is our PushTransfer job, buckets in parallel; to a plain Orthanc, the
  OrthancPeerStore job, one `POST /instances` per instance (accelerator.transfers.store_peer);
- `POST /peers/{name}/store-straight`: the body (a DICOM file) posted to the peer's `/instances`.

Where we answer differently: a peer that fails `/system` gives 500 Network protocol (9) with the
peer's status in Details (Orthanc echoes the peer's HTTP status, so that a 401 of the peer would
read as our own); `Transcode` is refused with 400 (we do not transcode); header values in a job's
`Peer` are shown as null (Orthanc shows them); a synchronous store that fails answers 500 Network
protocol (9) with the job's ErrorDetails; peers cannot be changed at run time (PUT/DELETE: 405).
"""

from __future__ import annotations

from typing import Any

import orjson
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.core import route
from accelerator.api.http import json_answer, read_body
from accelerator.config import Peer
from accelerator.jobs.engine import FINISHED, SUCCESS
from accelerator.peers import DISABLED, SMALL_ANSWER, Peers, detect_with_reasons, remote_job, remote_lookup
from accelerator.store.index import Index
from accelerator.transfers import push, store_peer
from protocol.errors import BadFileFormat, BadRequest, NetworkProtocol, UnknownResource
from protocol.messages import Created
from protocol.resources import Level

JSON_LIMIT = 64 * 1024 * 1024
OPERATIONS = ["configuration", "store", "store-straight", "system"]  # AutoListChildren: sorted
RESOURCES = "Resources"


def _peers(request: Request) -> Peers:
    return request.app.state.peers


def _peer(request: Request) -> Peer:
    name = request.path_params["name"]
    if name not in _peers(request):
        raise UnknownResource(f"No peer with symbolic name: {name}")
    return _peers(request).get(name).peer


def format_public(peer: Peer) -> dict[str, Any]:
    """Orthanc's `WebServiceParameters::FormatPublic`: what identifies the peer, no secret."""
    info: dict[str, Any] = {"Url": peer.url}
    if peer.username:
        info["Username"] = peer.username
        info["Password"] = None
    if peer.certificate_file:
        info.update(CertificateFile=peer.certificate_file, CertificateKeyFile=None, CertificateKeyPassword=None)
    info["Pkcs11"] = peer.pkcs11
    info["HttpHeaders"] = sorted(peer.http_headers)
    info["Timeout"] = peer.timeout
    info.update(peer.properties)
    return info


def serialize_public(peer: Peer) -> Any:
    """Orthanc's `WebServiceParameters::Serialize` without passwords (a job's `Peer`): the
    simple form `[Url]` / `[Url, Username, ""]` unless an advanced option is set. Header values
    are shown as null here (Orthanc shows them)."""
    advanced = (peer.certificate_file or peer.certificate_key_file or peer.certificate_key_password
                or peer.pkcs11 or peer.http_headers or peer.properties)
    if not advanced:
        return [peer.url, peer.username, ""] if peer.username or peer.password else [peer.url]
    value: dict[str, Any] = {"Url": peer.url}
    if peer.username or peer.password:
        value["Username"] = peer.username
    if peer.certificate_file:
        value["CertificateFile"] = peer.certificate_file
    if peer.certificate_key_file:
        value["CertificateKeyFile"] = peer.certificate_key_file
    value["Pkcs11"] = peer.pkcs11
    value["HttpHeaders"] = {name: None for name in peer.http_headers}
    value.update(peer.properties)
    return value


# -- routes ----------------------------------------------------------------------------------

async def get_transfers_peers(request: Request) -> Response:
    return json_answer(await _peers(request).detect())


async def list_peers(request: Request) -> Response:
    peers = _peers(request)
    names = sorted(peers.names())
    if "expand" in request.query_params:
        return json_answer({name: format_public(peers.get(name).peer) for name in names})
    return json_answer(names)


async def get_peer(request: Request) -> Response:
    _peer(request)
    return json_answer(OPERATIONS)


async def get_peer_configuration(request: Request) -> Response:
    return json_answer(format_public(_peer(request)))


async def get_peer_system(request: Request) -> Response:
    peer = _peer(request)
    client = _peers(request).get(peer.name)
    try:
        response = await client.request("GET", "/system", what="GET /system", expect_json=True,
                                        max_body=SMALL_ANSWER)
    except NetworkProtocol as exc:
        raise NetworkProtocol(f"Unable to get the system info from remote Orthanc peer {peer.name!r}: "
                              f"{exc.details}") from exc
    return Response(response.content, media_type="application/json")


async def post_store_straight(request: Request) -> Response:
    peer = _peer(request)
    body = await read_body(request, request.app.state.config.maximum_request_body_bytes)
    try:
        response = await _peers(request).get(peer.name).request(
            "POST", "/instances", content=body, headers={"Expect": "", "Content-Type": "application/dicom"},
            what="POST /instances (store-straight)", expect_json=True, max_body=SMALL_ANSWER)
    except NetworkProtocol as exc:
        raise NetworkProtocol(f"Cannot send DICOM to remote peer {peer.name!r}: {exc.details}") from exc
    return Response(response.content, media_type="application/json")


async def post_store(request: Request) -> Response:
    state = request.app.state
    name = request.path_params["name"]
    options, ids = _instances_to_export(await read_body(request, JSON_LIMIT))
    levels, sizes = await to_thread.run_sync(_resolve, state.store.index, ids)
    if "Transcode" in options:
        if not isinstance(options["Transcode"], str):
            raise BadFileFormat('The field "Transcode" must be a string')
        raise BadRequest("Transcode is not supported: this server sends the DICOM files as they are stored")
    compress = options.get("Compress")
    if compress is not None and not isinstance(compress, bool):
        raise BadFileFormat('The field "Compress" must be a Boolean')
    peer = _peer(request)
    permissive = _boolean(options, "Permissive", False)
    synchronous, priority = _job_options(options)

    engine = state.jobs
    transfers = bool(ids) and await _peers(request).probe(name) != DISABLED  # nothing to send: no push
    if transfers:
        query = {"Resources": [{"Level": level.title, "ID": public_id} for public_id, level in levels],
                 "Peer": name, "Compression": "none" if compress is False else "gzip", "Priority": priority}
        job_id = await engine.submit(push.JOB_TYPE, query, priority, {
            "Compression": query["Compression"], "Peer": name, "Resources": query["Resources"]})
    else:
        query = {"Peer": name, "Resources": ids, "Compress": bool(compress), "Permissive": permissive,
                 "PeerContent": serialize_public(peer)}
        job_id = await engine.submit(store_peer.JOB_TYPE, query, priority, store_peer.content(
            parents=ids, instances=len(sizes), failed=0, peer=query["PeerContent"],
            compress=bool(compress), size=0))
    if not synchronous:
        return json_answer(Created.job(job_id).to_json())
    job = await engine.wait(job_id, FINISHED)
    if job["State"] != SUCCESS:
        raise NetworkProtocol(f"Cannot send to peer {name!r}: {job.get('ErrorDetails') or job.get('ErrorDescription')}")
    if not transfers:
        return json_answer(job["Content"])
    return json_answer(store_peer.content(
        parents=ids, instances=len(sizes), failed=0, peer=serialize_public(peer),
        compress=compress is not False, size=sum(sizes.values())))


def _job_options(options: dict[str, Any]) -> tuple[bool, int]:
    """`Synchronous`/`Asynchronous` and `Priority`, read as Orthanc's SubmitGenericJob does."""
    if "Synchronous" in options:
        synchronous = _boolean(options, "Synchronous", True)
    else:
        synchronous = not _boolean(options, "Asynchronous", False)
    priority = options.get("Priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -2**31 <= priority < 2**31:
        raise BadFileFormat('The field "Priority" must be an integer')
    return synchronous, priority


def _boolean(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise BadFileFormat(f'The field "{key}" must be a Boolean')
    return value


def is_sha1(text: str) -> bool:
    """Orthanc's `Toolbox::IsSHA1`: 44 characters, dashes at 8/17/26/35, alphanumerics elsewhere."""
    return (len(text) == 44 and all(text[i] == "-" for i in (8, 17, 26, 35))
            and all(c.isascii() and c.isalnum() for i, c in enumerate(text) if i not in (8, 17, 26, 35)))


def _instances_to_export(body: bytes) -> tuple[dict[str, Any], list[str]]:
    """Orthanc's `GetInstancesToExport`: (the other fields of an object body, the IDs)."""
    stripped = body.strip(b"\0 \t\r\n\v\f")
    text = stripped.decode("ascii", "replace")
    if is_sha1(text):
        request: Any = [text]  # Orthanc <= 0.5.1 compatibility: the raw ID
    else:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadFileFormat("Must provide a JSON value") from None
    if isinstance(request, str):
        request = [request]
    elif not isinstance(request, (list, dict)):
        raise BadFileFormat("Must provide a JSON object, or a JSON array of strings")
    options: dict[str, Any] = {}
    if isinstance(request, dict):
        if RESOURCES not in request:
            raise BadFileFormat(f'Missing field in JSON: "{RESOURCES}"')
        if not isinstance(request[RESOURCES], list):
            raise BadFileFormat(f'JSON field "{RESOURCES}" must contain an array')
        options = {k: v for k, v in request.items() if k != RESOURCES}
        request = request[RESOURCES]
    ids = []
    for item in request:
        if not isinstance(item, str):
            raise BadFileFormat("Resources to be exported must be specified as a JSON array of strings")
        stripped_id = item.strip()
        if not is_sha1(stripped_id):
            raise BadFileFormat(f"This string is not a valid Orthanc identifier: {stripped_id}")
        ids.append(stripped_id)
    return options, ids


def _resolve(index: Index, ids: list[str]) -> tuple[list[tuple[str, Level]], dict[str, int]]:
    """Each ID with its level (404 for an unknown one, as Orthanc's AddChildInstances), and the
    DICOM size of every instance below them."""
    levels, sizes = [], {}
    for public_id in ids:
        for level in (Level.INSTANCE, Level.SERIES, Level.STUDY, Level.PATIENT):
            try:
                files = index.instance_files(level, public_id)
            except UnknownResource:
                continue
            levels.append((public_id, level))
            sizes.update((f.instance_id, f.attachment.size) for f in files)
            break
        else:
            raise UnknownResource(f"Unknown resource: {public_id}")
    return levels, sizes


# -- ours, for the CLI: peers seen through this daemon, with the peers' own credentials ----------

async def get_remote_states(request: Request) -> Response:
    """Every peer's state and, when disabled, why (`GET /transfers/peers` stays the plugin's)."""
    return json_answer(await detect_with_reasons(request.app.state.peers))


async def get_remote_job(request: Request) -> Response:
    """The peer's job (a bidirectional send: the peer pulls from us), fetched with the peer's
    credentials, so a client follows it without holding them."""
    name, job_id = request.path_params["name"], request.path_params["id"]
    return json_answer(await remote_job(request.app.state.peers, name, job_id))


async def post_remote_lookup(request: Request) -> Response:
    """What the peer holds under an identifier (the body, as `POST /tools/lookup`)."""
    value = (await read_body(request, LOOKUP_LIMIT)).decode("utf-8", "replace").strip()
    return json_answer(await remote_lookup(request.app.state.peers, request.path_params["name"], value))


LOOKUP_LIMIT = 1024  # bytes of an identifier to look up


def routes() -> list[Route]:
    return [
        route("/transfers/remote", GET=get_remote_states),
        route("/transfers/remote/{name}/jobs/{id}", GET=get_remote_job),
        route("/transfers/remote/{name}/lookup", POST=post_remote_lookup),
        route("/transfers/peers", GET=get_transfers_peers),
        route("/peers", GET=list_peers),
        route("/peers/{name}", GET=get_peer),
        route("/peers/{name}/configuration", GET=get_peer_configuration),
        route("/peers/{name}/system", GET=get_peer_system),
        route("/peers/{name}/store", POST=post_store),
        route("/peers/{name}/store-straight", POST=post_store_straight),
    ]
