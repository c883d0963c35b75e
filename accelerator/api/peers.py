"""GET /transfers/peers: every configured peer and whether it runs the transfers protocol (3.1, 10)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.core import route
from accelerator.api.http import json_answer
from accelerator.peers import Peers


async def get_peers(request: Request) -> Response:
    peers: Peers = request.app.state.peers
    return json_answer(await peers.detect())


def routes() -> list[Route]:
    return [route("/transfers/peers", GET=get_peers)]
