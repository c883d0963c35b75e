"""The web page for the people who run transfers (issue 14): `GET /` redirects (307) to `/ui/`,
`/ui/` is `accelerator/ui/static/index.html`, `/ui/{file}` the page's modules and style sheet.

Plain files shipped in the package, no build step. They go through the daemon's own middleware
like every route (remote-access rule, Basic auth): the page adds no new way in, and its fetches
are same-origin requests carrying the browser's credentials. `NormalisePath` drops the trailing
slash, so `/ui/` arrives here as `/ui`; the HTML therefore names its files by absolute paths.
"""

from __future__ import annotations

import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from accelerator.api.core import route
from protocol.errors import UnknownResource

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")  # flat folder: no '/', no '..'
MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated: a daemon upgrade shows its own page at once
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'none'"),
}


def _file(name: str) -> Response:
    match = _NAME.match(name)
    path = STATIC / name
    if match is None or not path.is_file():
        raise UnknownResource(f"No such file in the web page: {name[:80]}")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[match.group(1)], headers=HEADERS)


async def get_root(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


async def get_index(request: Request) -> Response:
    return _file("index.html")


async def get_static(request: Request) -> Response:
    return _file(request.path_params["name"])


def routes() -> list[Route]:
    return [
        route("/", GET=get_root),
        route("/ui", GET=get_index),
        route("/ui/{name:path}", GET=get_static),
    ]
