"""Build the ASGI application from a configuration and a store: routes, middleware, the jobs
engine with its pull and push drivers, the peers, and the push receiver."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect

from accelerator.api import (
    archive, core, find, jobs, move_storage, operations, peers, replication, storage, tags, transfers, ui,
)
from accelerator.api.http import (
    handle_client_disconnect,
    handle_http_exception,
    handle_orthanc_error,
    handle_os_error,
    handle_unexpected,
)
from accelerator.api.middleware import AccessControl, NormalisePath
from accelerator.config import Config
from accelerator.jobs import move_storage as move
from accelerator.jobs.engine import JobsEngine
from accelerator.peers import Peers
from accelerator.replication import job as replicate
from accelerator.replication.gateway import Gateway
from accelerator.replication.sides import SideOpener
from accelerator.store import Store
from accelerator.store.hybrid import HybridStorage
from accelerator.store.index import IndexBase
from accelerator.store.objects import ObjectStorage, ObjectStorageSettings, object_storage
from accelerator.store.pending import IndexMarkers
from accelerator.store.storage import OBJECT_STORAGE, FileSystemStorage, Storage
from accelerator.transfers import pull, push, store_peer
from accelerator.transfers.receiver import PushReceiver
from accelerator.transfers.shared_receiver import SharedPushReceiver
from protocol.errors import OrthancError

log = logging.getLogger(__name__)

TRANSFERS_FOLDER = ".transfers"  # download areas, next to the storage area (same filesystem)
PENDING_OBJECTS = ".pending-objects"  # markers of objects staged in object storage
SETTLE_INTERVAL = 600.0  # seconds between two recoveries of a replica


def open_store(config: Config, *, upgrade: bool = False) -> Store:
    index = open_index(config, upgrade=upgrade)
    try:
        storage = open_storage(config)
    except BaseException:
        if index is not None:
            index.close()
        raise
    store = Store(
        Path(config.storage_directory),
        Path(config.index_directory),
        compress=config.storage_compression,
        overwrite=config.overwrite_instances,
        upgrade=upgrade,
        storage=storage,
        index=index,
    )
    shared = shared_objects(storage) if is_replica(config) else None
    if shared is not None:  # what a replica stages, any replica can settle
        shared.share_markers(IndexMarkers(store.index), store.index.committed_uuids)
        store.recover()
    return store


async def _settle_periodically(store: Store) -> None:
    """Replicas: settle now and then what dead replicas left staged (and the trash)."""
    while True:
        await anyio.sleep(SETTLE_INTERVAL)
        try:
            await anyio.to_thread.run_sync(store.recover)
        except OrthancError as exc:
            log.warning("could not settle staged objects: %s", exc)


def is_replica(config: Config) -> bool:
    """One of several daemons on one PostgreSQL index (`Lock` false)."""
    return config.postgresql_index is not None and not config.postgresql_index.lock


def open_index(config: Config, *, upgrade: bool = False) -> IndexBase | None:
    """The PostgreSQL index of a `PostgreSQL` section with `EnableIndex`; None for the default
    (SQLite under `IndexDirectory`, which the store opens itself)."""
    section = config.postgresql_index
    if section is None:
        return None
    from accelerator.store.postgres_index import PostgresIndex, PostgresSettings  # psycopg only when used

    return PostgresIndex(PostgresSettings(**section.settings_kwargs()), upgrade=upgrade)


def open_storage(config: Config) -> Storage:
    """Where attachments live: `StorageDirectory`, or the object storage of `AwsS3Storage` /
    `AzureBlobStorage` (checked now: a missing bucket or wrong credentials stop the start), or
    both with `HybridMode`. `StorageDirectory` stays the local folder of transfers and uploads."""
    file_system = FileSystemStorage(Path(config.storage_directory))
    section = config.object_storage
    if section is None:
        return file_system
    objects = object_storage(ObjectStorageSettings(**section.settings_kwargs()),
                             Path(config.storage_directory) / PENDING_OBJECTS)
    objects.check()
    if section.hybrid_mode == "Disabled":
        return objects
    return HybridStorage(file_system, objects, section.hybrid_mode)


def create_app(config: Config, store: Store | None = None, *, peers_: Peers | None = None) -> Starlette:
    """The daemon's app; it owns `store` (opened from `config` if not given) and closes it.

    Jobs run while the app's lifespan runs (uvicorn enters it; in-process tests enter
    `app.state.jobs.running()` themselves). `peers_` replaces the peers (tests route them in-process).
    """
    store = store or open_store(config)
    peer_clients = peers_ or Peers(config)
    gateway = Gateway(config.gateway, config, store) if config.gateway is not None else None
    engine = _jobs_engine(config, store, peer_clients, gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with engine.running(), anyio.create_task_group() as tasks:  # jobs stop before the store closes
                tasks.start_soon(app.state.receiver.expire_periodically)
                if gateway is not None:
                    tasks.start_soon(gateway.forward_forever)
                if is_replica(config):
                    tasks.start_soon(_settle_periodically, store)
                yield
                tasks.cancel_scope.cancel()
        finally:
            await peer_clients.aclose()
            if gateway is not None:
                await gateway.aclose()
            store.close()

    users = config.registered_users if config.authentication_enabled else None
    app = Starlette(
        routes=find.routes() + tags.routes() + archive.routes() + operations.routes() + core.routes()
        + transfers.routes() + jobs.routes() + peers.routes() + storage.routes() + move_storage.routes()
        + replication.routes() + ui.routes(),
        middleware=[
            Middleware(NormalisePath),
            Middleware(AccessControl, remote_access=config.remote_access_allowed, users=users),
        ],
        exception_handlers={  # all but `Exception` are answered in place, never re-raised
            OrthancError: handle_orthanc_error,
            HTTPException: handle_http_exception,
            ClientDisconnect: handle_client_disconnect,
            OSError: handle_os_error,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.store = store
    app.state.describe_errors = config.http_describe_errors
    app.state.originator = str(uuid.uuid4())  # the "plugin UUID": new at every start (spec 1)
    app.state.peers = peer_clients
    app.state.jobs = engine
    app.state.gateway = gateway
    app.state.receiver = _push_receiver(config, store)
    return app


def _push_receiver(config: Config, store: Store) -> PushReceiver:
    """The push receiver; replicas (a shared PostgreSQL index without `Lock`, and object
    storage) keep their transactions where every replica can continue them."""
    options = dict(
        max_transactions=config.transfers.max_push_transactions,
        idle_timeout=config.transfers.push_transaction_timeout,
        limits=config.transfers.limits,
        commit_threads=config.transfers.commit_threads_count,
        drain_timeout=config.http_request_timeout + 1,  # the body of a stalled PUT is cut by then
    )
    folder = Path(config.storage_directory) / TRANSFERS_FOLDER / "push"
    shared = shared_objects(store.area.storage)
    if is_replica(config) and shared is not None:
        return SharedPushReceiver(store, folder, shared, **options)
    return PushReceiver(store, folder, **options)


def shared_objects(storage: Storage) -> ObjectStorage | None:
    """The object storage of the storage area, if it has one."""
    if isinstance(storage, ObjectStorage):
        return storage
    if isinstance(storage, HybridStorage):
        side = storage.sides.get(OBJECT_STORAGE)
        return side if isinstance(side, ObjectStorage) else None
    return None


def _jobs_engine(config: Config, store: Store, peer_clients: Peers, gateway: Gateway | None = None) -> JobsEngine:
    settings = config.transfers
    pull_driver = pull.PullDriver(
        store=store, peers=peer_clients, folder=Path(config.storage_directory) / TRANSFERS_FOLDER / "pull",
        bucket_size=settings.bucket_size_bytes, threads=settings.threads, retries=settings.max_http_retries,
        skip_stored=settings.skip_stored_instances, adaptive=settings.adaptive_bucket_size,
    )
    push_driver = push.PushDriver(
        store=store, peers=peer_clients, bucket_size=settings.bucket_size_bytes, threads=settings.threads,
        commit_timeout=settings.peer_commit_timeout, adaptive=settings.adaptive_bucket_size,
    )
    engine = JobsEngine.from_config(config, store.index)
    engine.register(pull.JOB_TYPE, lambda ctx: pull_driver)
    engine.register(push.JOB_TYPE, lambda ctx: push_driver)
    mover = move.MoveStorageDriver(store=store)  # one for all jobs: it serialises moves of one attachment
    engine.register(move.JOB_TYPE, lambda ctx: mover)
    peer_store = store_peer.PeerStoreDriver(store=store, peers=peer_clients, workers=min(settings.threads, 4))
    engine.register(store_peer.JOB_TYPE, lambda ctx: peer_store)
    replicator = replicate.ReplicateDriver(
        store=store, open_ends=SideOpener(config, peer_clients, store, gateway), pull_driver=pull_driver,
        push_driver=push_driver)
    engine.register(replicate.JOB_TYPE, lambda ctx: replicator)
    return engine
