"""accelerator.api.ui: the web page at /ui/ (issue 14), served in-process like any route."""

from __future__ import annotations

import re

import pytest

from accelerator.api.app import create_app, open_store
from accelerator.api.ui import STATIC
from tests.conftest import asgi_client

pytestmark = pytest.mark.anyio

CONTRACT_IDS = [
    "tab-studies", "tab-peers", "tab-jobs", "studies", "peers", "jobs",
    "q-patient-name", "q-patient-id", "q-study-date", "q-description", "q-accession", "search",
    "study-results", "send-peer", "send-compression", "send", "send-status", "peer-list", "job-list",
]
MODULES = sorted(p.name for p in STATIC.glob("*.js"))


@pytest.fixture
def app_for(make_config):
    stores = []

    def build(options=None):
        config = make_config(options or {})
        store = open_store(config)
        stores.append(store)
        return create_app(config, store)

    yield build
    for store in stores:
        store.close()


async def test_root_redirects_to_the_page(app_for):
    async with asgi_client(app_for()) as client:
        answer = await client.get("/")
        assert answer.status_code == 307
        assert answer.headers["location"] == "/ui/"


@pytest.mark.parametrize("path", ["/ui/", "/ui", "/ui/index.html"])
async def test_the_page_has_the_contract_ids(app_for, path):
    async with asgi_client(app_for()) as client:
        answer = await client.get(path)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    ids = set(re.findall(r'\bid="([^"]+)"', answer.text))
    assert set(CONTRACT_IDS) <= ids
    for section in ("peers", "jobs"):  # only the Studies section shows before the script runs
        assert re.search(rf'<section id="{section}"[^>]*\bhidden\b', answer.text)
    assert '<script type="module" src="/ui/app.js">' in answer.text


async def test_modules_and_style_are_served_with_their_types(app_for):
    assert {"app.js", "api.js", "jobs.js", "peers.js", "studies.js"} <= set(MODULES)
    async with asgi_client(app_for()) as client:
        for name in MODULES:
            answer = await client.get(f"/ui/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
            assert answer.headers["x-content-type-options"] == "nosniff"
            for imported in re.findall(r'from "\./([^"]+)"', answer.text):  # every import resolves
                assert imported in MODULES, (name, imported)
        css = await client.get("/ui/style.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/../app.py", "/ui/%2e%2e/api/ui.py", "/ui/static/app.js",
                                  "/ui/App.js", "/ui/.hidden.js"])
async def test_nothing_else_is_served(app_for, path):
    async with asgi_client(app_for()) as client:
        answer = await client.get(path)
    assert answer.status_code == 404


async def test_the_page_needs_the_daemons_credentials(app_for):
    app = app_for({"AuthenticationEnabled": True, "RegisteredUsers": {"alice": "orthanctest"}})
    async with asgi_client(app) as client:
        for path in ("/", "/ui/", "/ui/app.js"):
            answer = await client.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == 'Basic realm="Orthanc Secure Area"'
        assert (await client.get("/ui/", auth=("alice", "orthanctest"))).status_code == 200
        assert (await client.get("/ui/app.js", auth=("alice", "wrong"))).status_code == 401


async def test_remote_clients_are_refused_by_default(app_for):
    async with asgi_client(app_for(), client_host="192.168.1.10") as client:
        for path in ("/", "/ui/", "/ui/app.js"):
            assert (await client.get(path)).status_code == 403, path


async def test_remote_access_allowed_asks_for_credentials(app_for):
    app = app_for({"RemoteAccessAllowed": True, "RegisteredUsers": {"alice": "orthanctest"}})
    async with asgi_client(app, client_host="10.0.0.7") as client:
        assert (await client.get("/ui/")).status_code == 401
        assert (await client.get("/ui/", auth=("alice", "orthanctest"))).status_code == 200
