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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_config(tmp_path) -> Callable[..., Config]:
    def make(options: dict[str, Any] | None = None) -> Config:
        return config_from_dict({"StorageDirectory": str(tmp_path / "storage"), **(options or {})})

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
