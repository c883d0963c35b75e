"""Build the ASGI application from a configuration and a store."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from accelerator.api import core, transfers
from accelerator.api.http import handle_http_exception, handle_orthanc_error, handle_unexpected
from accelerator.api.middleware import AccessControl, NormalisePath
from accelerator.config import Config
from accelerator.store import Store
from accelerator.transfers.receiver import PushReceiver
from protocol.errors import OrthancError

TRANSFERS_FOLDER = ".transfers"  # download areas, next to the storage area (same filesystem)


def open_store(config: Config, *, upgrade: bool = False) -> Store:
    return Store(
        Path(config.storage_directory),
        Path(config.index_directory),
        compress=config.storage_compression,
        overwrite=config.overwrite_instances,
        upgrade=upgrade,
    )


def create_app(config: Config, store: Store | None = None) -> Starlette:
    """The daemon's app; it owns `store` (opened from `config` if not given) and closes it."""
    store = store or open_store(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    users = config.registered_users if config.authentication_enabled else None
    app = Starlette(
        routes=core.routes() + transfers.routes(),
        middleware=[
            Middleware(NormalisePath),
            Middleware(AccessControl, remote_access=config.remote_access_allowed, users=users),
        ],
        exception_handlers={
            OrthancError: handle_orthanc_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.store = store
    app.state.describe_errors = config.http_describe_errors
    app.state.originator = str(uuid.uuid4())  # the "plugin UUID": new at every start (spec 1)
    app.state.receiver = PushReceiver(
        store,
        Path(config.storage_directory) / TRANSFERS_FOLDER / "push",
        max_transactions=config.transfers.max_push_transactions,
        idle_timeout=config.http_timeout,
        commit_threads=config.transfers.commit_threads_count,
    )
    return app
