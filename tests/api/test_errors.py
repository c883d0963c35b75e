"""How the API answers and logs errors, in-process: bounded echoes, a full disk met anywhere,
a client hanging up (the real server's side of these is in test_server.py)."""

from __future__ import annotations

import errno
import logging

import pytest

from accelerator.api import core
from accelerator.api.app import create_app
from tests.conftest import asgi_client

pytestmark = pytest.mark.anyio


async def test_error_details_and_uri_are_cut(client):
    """A huge ID used to be echoed twice, whole: a 30 MB ID gave a 30 MB answer."""
    huge = "a" * 60_000  # httpx refuses longer URLs
    answer = await client.get(f"/patients/{huge}")
    assert answer.status_code == 404 and len(answer.content) < 3000
    body = answer.json()
    assert body["Uri"] == f"/patients/{'a' * 990}... (60010 characters)"
    assert body["Details"].endswith("... (60017 characters)") and body["Details"].startswith("Unknown patient: aaa")


async def test_a_full_disk_anywhere_is_507_in_one_line(make_config, store, monkeypatch, caplog):
    async def full(request):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/file")

    monkeypatch.setattr(core, "get_statistics", full)
    async with asgi_client(create_app(make_config(), store)) as client:
        answer = await client.get("/statistics")
    assert answer.status_code == 507
    assert (answer.json()["OrthancStatus"], answer.json()["Details"]) == (14, "Cannot write: No space left on device")
    assert [r.levelno for r in caplog.records if r.name.startswith("accelerator")] == [logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]


async def test_another_os_error_is_a_logged_500(make_config, store, monkeypatch, caplog):
    async def broken(request):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(core, "get_statistics", broken)
    async with asgi_client(create_app(make_config(), store)) as client:
        answer = await client.get("/statistics")
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == -1
    assert len([r for r in caplog.records if r.exc_info]) == 1


async def test_a_client_hanging_up_mid_body_ends_the_request_quietly(config, store, caplog):
    """The ASGI view of a disconnect: the app returns (nothing re-raised for the server to log
    again) and logs one debug line, no traceback."""
    caplog.set_level(logging.DEBUG, logger="accelerator")
    app = create_app(config, store)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/instances", "raw_path": b"/instances", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"test"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8042),
    }
    messages = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    await app(scope, receive, send)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert any("disconnected" in r.getMessage() for r in caplog.records)
