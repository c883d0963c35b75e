"""accelerator.api.middleware: remote-access rule and HTTP Basic authentication."""

from __future__ import annotations

import pytest

from accelerator.api.app import create_app, open_store
from tests.conftest import asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def app_for(make_config):
    stores = []

    def build(options):
        config = make_config(options)
        store = open_store(config)
        stores.append(store)
        return create_app(config, store)

    yield build
    for store in stores:
        store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_loopback_clients_are_served(app_for, host):
    async with asgi_client(app_for({}), client_host=host) as client:
        assert (await client.get("/system")).status_code == 200


@pytest.mark.parametrize("host", ["192.168.1.10", "10.0.0.1", "2001:db8::1", "::ffff:10.1.1.1"])
async def test_remote_clients_are_refused_by_default(app_for, host):
    async with asgi_client(app_for({}), client_host=host) as client:
        answer = await client.get("/system")
        assert answer.status_code == 403
        assert "RemoteAccessAllowed" in answer.json()["Details"]
        assert (await client.post("/instances", content=b"x")).status_code == 403


async def test_remote_access_allowed_turns_authentication_on(app_for):
    app = app_for({"RemoteAccessAllowed": True, "RegisteredUsers": {"alice": "orthanctest"}})
    async with asgi_client(app, client_host="192.168.1.10") as client:
        assert (await client.get("/system")).status_code == 401
        assert (await client.get("/system", auth=("alice", "orthanctest"))).status_code == 200


@pytest.mark.parametrize("auth, status", [
    (None, 401),
    (("alice", "wrong"), 401),
    (("bob", "orthanctest"), 401),
    (("alice", "orthanctest"), 200),
    (("carol", "pass:with:colons"), 200),
])
async def test_basic_authentication(app_for, auth, status):
    app = app_for({"AuthenticationEnabled": True,
                   "RegisteredUsers": {"alice": "orthanctest", "carol": "pass:with:colons"}})
    async with asgi_client(app) as client:
        answer = await client.get("/statistics", auth=auth)
        assert answer.status_code == status
        if status == 401:
            assert answer.headers["www-authenticate"] == 'Basic realm="Orthanc Secure Area"'


@pytest.mark.parametrize("header", ["Bearer abc", "Basic !!!notbase64", "Basic", "basic YWxpY2U="])
async def test_malformed_authorization_headers_are_401(app_for, header):
    app = app_for({"AuthenticationEnabled": True, "RegisteredUsers": {"alice": "x"}})
    async with asgi_client(app) as client:
        assert (await client.get("/system", headers={"Authorization": header})).status_code == 401


async def test_authentication_enabled_without_users_refuses_everyone(app_for):
    app = app_for({"AuthenticationEnabled": True})
    async with asgi_client(app) as client:
        assert (await client.get("/system", auth=("any", "one"))).status_code == 401
