"""ASGI middleware: Orthanc's path normalisation, remote-access rule and HTTP Basic auth.

They run before routing so that every route, present and future, gets the same treatment.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from accelerator.api.http import error_answer
from protocol.errors import Forbidden, Unauthorized

_SLASHES = re.compile(r"/{2,}")


class NormalisePath:
    """Collapse runs of `/` and drop a trailing `/` (spec 2.1: `//transfers/...`, `/patients/`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _SLASHES.sub("/", scope["path"])
            if len(path) > 1 and path.endswith("/"):
                path = path[:-1]
            if path != scope["path"]:
                scope = dict(scope, path=path, raw_path=path.encode())
        await self.app(scope, receive, send)


class AccessControl:
    """`RemoteAccessAllowed` (403 for non-loopback clients) then Basic auth (401 + challenge)."""

    REALM = 'Basic realm="Orthanc Secure Area"'

    def __init__(self, app: ASGIApp, *, remote_access: bool, users: dict[str, str] | None):
        self.app = app
        self.remote_access = remote_access
        # Compare encoded credentials so that a user name with ':' cannot shift the split.
        self.credentials = [f"{u}:{p}".encode() for u, p in (users or {}).items()] if users is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = None
        if not self.remote_access and not _is_loopback(scope.get("client")):
            error = Forbidden("Remote access is not allowed (RemoteAccessAllowed is false)")
        elif self.credentials is not None and not self._authorised(scope):
            error = Unauthorized(headers={"WWW-Authenticate": self.REALM})
        if error is None:
            await self.app(scope, receive, send)
            return
        response = error_answer(Request(scope), error)
        await response(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        matched = False
        for expected in self.credentials or ():  # no early exit: constant time over the users
            matched |= hmac.compare_digest(given, expected)
        return matched


def _is_loopback(client) -> bool:
    if not client:
        return False
    host = client[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback
