"""accelerator.api.server: the real uvicorn server on loopback, started as `accelerator serve`
starts it, against clients that stall, flood, send garbage or hang up mid-upload."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import uvicorn

from accelerator.api import core
from accelerator.api.app import create_app
from accelerator.api.server import uvicorn_config

TIMEOUT = 1  # HttpRequestTimeout of every server here, in seconds
LIMIT = 20  # HttpMaxConnections
GET_SYSTEM = b"GET /system HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture
def serve(make_config, monkeypatch):
    """`with serve() as (host, port):` runs the daemon's app in uvicorn in a thread, configured by
    `uvicorn_config` exactly as the CLI does."""

    @contextlib.contextmanager
    def start(**options) -> Iterator[tuple[str, int]]:
        config = make_config({"HttpRequestTimeout": TIMEOUT, "HttpMaxConnections": LIMIT, **options})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn_config(config, create_app(config)))
        monkeypatch.setattr(logging.getLogger("uvicorn"), "propagate", True)  # caplog sees uvicorn too
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.01)
            yield sock.getsockname()[:2]
        finally:
            server.should_exit = True
            thread.join(10)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5)
            sock.close()

    return start


def _connect(address) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def _read_response(sock: socket.socket, within: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (or up to EOF), read in `within` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while time.monotonic() < deadline:
        head, found, body = data.partition(b"\r\n\r\n")
        if found:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if len(body) >= int(headers.get("content-length", 1 << 62)):
                return int(lines[0].split()[1]), headers, body
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (whatever it sends before)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


# -- item 4: stalled clients and the connection limit ------------------------------------------

def test_slowloris_clients_are_cut_and_the_limit_answers_json_503(serve):
    with serve() as address:
        stalled = [_connect(address) for _ in range(LIMIT)]
        try:
            for sock in stalled:
                sock.sendall(b"GET /system HTTP/1.1\r\nHo")  # half a request, then nothing
            time.sleep(0.1)
            with _connect(address) as extra:
                extra.sendall(GET_SYSTEM)
                status, headers, body = _read_response(extra)
            assert status == 503
            assert headers["content-type"] == "application/json" and headers["retry-after"].isdigit()
            assert orjson.loads(body)["OrthancStatus"] == 36
            started = time.monotonic()
            assert all(_closed_by_server(sock, within=TIMEOUT + 2) for sock in stalled)
            assert time.monotonic() - started < TIMEOUT + 2
        finally:
            for sock in stalled:
                sock.close()
        assert httpx.get("http://%s:%d/system" % address, timeout=5).status_code == 200


def test_trickled_headers_do_not_extend_the_deadline(serve):
    with serve() as address, _connect(address) as sock:
        started, closed = time.monotonic(), False
        sock.sendall(b"GET /system HTTP/1.1\r\nX-Slow: ")
        for _ in range(50):  # one byte every 0.1 s: 5 s at most
            try:
                sock.sendall(b"a")
            except OSError:
                closed = True
                break
            if _closed_by_server(sock, within=0.1):
                closed = True
                break
        assert closed and time.monotonic() - started < TIMEOUT + 1.5


def test_a_keep_alive_connection_gets_a_new_deadline_for_each_request(serve):
    with serve() as address, _connect(address) as sock:
        sock.sendall(GET_SYSTEM)
        assert _read_response(sock)[0] == 200
        time.sleep(TIMEOUT + 0.2)  # idle between requests is the keep-alive timeout's business
        sock.sendall(GET_SYSTEM)
        assert _read_response(sock)[0] == 200
        sock.sendall(b"GET /sys")
        assert _closed_by_server(sock, within=TIMEOUT + 2)


def test_a_stalled_body_is_cut_a_slow_one_is_not(serve, caplog):
    caplog.set_level(logging.DEBUG, logger="accelerator")
    with serve() as address:
        with _connect(address) as sock:
            sock.sendall(b"POST /instances HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            assert _closed_by_server(sock, within=TIMEOUT + 2)
        with _connect(address) as sock:  # 5 pauses of half the timeout: 2.5 timeouts in all
            sock.sendall(b"POST /instances HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(5):
                time.sleep(TIMEOUT / 2)
                sock.sendall(b"x" * 200)
            status, _, body = _read_response(sock)
        assert status == 400 and orjson.loads(body)["OrthancStatus"] == 15  # not DICOM: it was read
    assert not _tracebacks(caplog)


def test_a_request_that_does_not_parse_gets_orthanc_json_400(serve):
    with serve() as address, _connect(address) as sock:
        sock.sendall(b"\x01\x02 nonsense\r\n\r\n")
        status, headers, body = _read_response(sock)
    assert status == 400 and headers["content-type"] == "application/json"
    answer = orjson.loads(body)
    assert (answer["HttpStatus"], answer["OrthancStatus"]) == (400, 8)


# -- item 8: log floods ------------------------------------------------------------------------

@pytest.mark.parametrize("declared", [1 << 20, 20 << 20], ids=["in-memory", "through-a-file"])
def test_a_client_hanging_up_mid_upload_logs_no_traceback(serve, caplog, declared):
    caplog.set_level(logging.DEBUG, logger="accelerator")

    def settled() -> bool:
        return any("disconnect" in r.getMessage().lower() or r.exc_info
                   for r in caplog.records if r.name.startswith("accelerator"))

    with serve() as address:
        for _ in range(3):
            with _connect(address) as sock:
                sock.sendall(b"POST /instances HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % declared)
                sock.sendall(b"\0" * (512 << 10))
        deadline = time.monotonic() + 5
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything uvicorn would add comes right after
        assert settled()
        assert httpx.get("http://%s:%d/system" % address, timeout=5).status_code == 200
    assert not _tracebacks(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unexpected_exception_is_logged_once_and_answered_as_orthanc(serve, caplog, monkeypatch):
    async def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(core, "get_statistics", broken)
    with serve() as address, httpx.Client(base_url="http://%s:%d" % address, timeout=5) as client:
        answer = client.get("/statistics")
        assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
        assert answer.json()["OrthancStatus"] == -1 and "boom" in answer.json()["Details"]
        assert client.get("/system").status_code == 200
        time.sleep(0.3)
    logged = _tracebacks(caplog)
    assert len(logged) == 1 and "/statistics" in logged[0].getMessage()
