"""The index on PostgreSQL, shared by replicas: the queries of `IndexBase` over a psycopg 3 pool.

Only what differs from SQLite lives here: connections, transactions, the dialect. psycopg's
blocking API fits the index's callers, which already run in worker threads.

- Connections come from a pool of `IndexConnectionsCount` (autocommit: a write is an explicit
  transaction); each one is checked when taken, so after PostgreSQL restarts the pool drops the
  dead ones and connects again (within a second or two, however long the outage was).
- A write transaction that meets a serialization failure or a deadlock is run again from scratch,
  after a growing pause, at most `retries` times; then `DatabaseCannotSerialize` (503).
- A server that cannot be reached, or a connection lost, is `DatabaseUnavailable` (503, as
  Orthanc), never a 500; a full disk is `FullStorage` (507).
- At open: up to `MaximumConnectionRetries` attempts to connect, `ConnectionRetryInterval`
  seconds apart (a database starting with the daemon); schema creation or upgrade under an
  advisory lock (accelerator.store.schema). With `Lock` (the default, as Orthanc's plugin) the
  daemon holds an exclusive session advisory lock for its lifetime: a second daemon on the same
  database is refused. Replicas set `Lock` to false and hold the same lock shared, so replicas
  coexist but a `Lock: true` daemon and replicas on one database refuse each other. A lock still
  held by the session of a daemon that just died is waited for a moment (`lock_wait`).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import orjson
import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.errors import DeadlockDetected, DiskFull, SerializationFailure
from psycopg_pool import ConnectionPool

from accelerator.store import schema
from accelerator.store.index import IndexBase, T
from protocol.errors import ConfigError, DatabaseCannotSerialize, DatabaseUnavailable, FullStorage

log = logging.getLogger(__name__)

DAEMON_LOCK = 0x61636302  # session advisory lock key: exclusive with `Lock: true`, else shared
RETRIES = 10  # reruns of a transaction that met a serialization failure or a deadlock
FIRST_PAUSE, LONGEST_PAUSE = 0.02, 1.0  # seconds before a rerun; doubles each time
CONNECT_TIMEOUT = 5  # seconds to open one connection
# The pool retries a failed connection with a doubling pause; past this many seconds it gives up
# and the next request starts afresh. Kept short: after a long outage the pause would have grown
# to minutes, and requests would keep failing long after the server is back.
RECONNECT_WINDOW = 2.0


@dataclass(frozen=True)
class PostgresSettings:
    """The `PostgreSQL` section, as the index needs it (accelerator.config builds it)."""

    connection_uri: str = field(default="", repr=False)  # wins over the fields below when set
    host: str = "localhost"
    port: int = 5432
    database: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    enable_ssl: bool = False
    lock: bool = True
    maximum_connection_retries: int = 10
    connection_retry_interval: int = 5  # seconds
    index_connections_count: int = 50
    connection_wait: float = 5.0  # seconds a request waits for a free (or new) connection
    lock_wait: float = 3.0  # seconds to wait for the daemon lock (held by a session just ended)

    def conninfo(self) -> str:
        if self.connection_uri:
            return pg_conninfo.make_conninfo(self.connection_uri, connect_timeout=CONNECT_TIMEOUT)
        options = {"host": self.host, "port": self.port, "dbname": self.database or None,
                   "user": self.username or None, "password": self.password or None,
                   "sslmode": "require" if self.enable_ssl else None}
        return pg_conninfo.make_conninfo(connect_timeout=CONNECT_TIMEOUT,
                                         **{k: v for k, v in options.items() if v is not None})

    def describe(self) -> str:
        """Where the index is, for logs and errors: no password."""
        parts = pg_conninfo.conninfo_to_dict(self.conninfo())
        user = f"{parts['user']}@" if parts.get("user") else ""
        return f"postgresql://{user}{parts.get('host', '')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """The shared SQL's `?` placeholders as psycopg's `%s` (the queries hold no other ? or %)."""
    return sql.replace("?", "%s")


class _Connection:
    """A psycopg connection with the two calls the shared queries make, in their dialect."""

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def execute(self, sql: str, params: tuple = ()) -> psycopg.Cursor:
        return self._conn.execute(_placeholders(sql), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(_placeholders(sql), rows)


class PostgresIndex(IndexBase):
    UNLIMITED = None
    MAIN_TAG_SQL = "main_tags::json ->> CAST(? AS TEXT)"
    # Jobs: the server's clock (clock_timestamp: the time now, not at the transaction's start),
    # and row locks so that replicas claiming at once take different jobs without waiting.
    NOW_SQL = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"
    LOCK_ROWS = " FOR UPDATE"
    SKIP_LOCKED_ROWS = " FOR UPDATE SKIP LOCKED"
    JOB_CHANGED_SQL = "record::json ->> 'changed'"

    def __init__(self, settings: PostgresSettings, *, upgrade: bool = False):
        super().__init__()
        self.settings = settings
        self.path = settings.describe()
        self.retries = RETRIES
        self.connection_wait = settings.connection_wait
        conninfo = settings.conninfo()
        first = self._connect_at_start(conninfo)
        self._lock_connection: psycopg.Connection | None = None
        try:
            with self._database_errors():
                schema.postgres_prepare(first, upgrade=upgrade, where=self.path)
                self._take_daemon_lock(first)
        finally:
            if self._lock_connection is None:
                first.close()
        self._pool = ConnectionPool(
            conninfo, min_size=1, max_size=settings.index_connections_count, kwargs={"autocommit": True},
            check=ConnectionPool.check_connection, open=False, timeout=settings.connection_wait,
            reconnect_timeout=RECONNECT_WINDOW, name="accelerator-index",
        )
        try:
            with self._database_errors():
                self._pool.open(wait=True, timeout=max(settings.connection_wait, CONNECT_TIMEOUT))
        except BaseException:
            self.close()
            raise

    @property
    def shared(self) -> bool:
        """Replicas (`Lock` false) share the database; with `Lock` this daemon has it alone."""
        return not self.settings.lock

    def _connect_at_start(self, conninfo: str) -> psycopg.Connection:
        """A first connection, tried `MaximumConnectionRetries` more times if the server is not
        there yet (as Orthanc's plugin)."""
        attempts = self.settings.maximum_connection_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return psycopg.connect(conninfo, autocommit=True)
            except psycopg.OperationalError as exc:
                if attempt == attempts:
                    raise DatabaseUnavailable(
                        f"Cannot connect to the PostgreSQL index {self.path} after {attempts} attempt(s): "
                        f"{str(exc).strip()}") from None
                log.warning("cannot connect to the PostgreSQL index %s (attempt %d of %d), retrying in %d s: %s",
                            self.path, attempt, attempts, self.settings.connection_retry_interval, exc)
                time.sleep(self.settings.connection_retry_interval)
        raise AssertionError("unreachable")

    def _take_daemon_lock(self, conn: psycopg.Connection) -> None:
        """Exclusive with `Lock: true` (this daemon alone uses the database), shared by replicas;
        held as long as `conn` stays open."""
        function = "pg_try_advisory_lock" if self.settings.lock else "pg_try_advisory_lock_shared"
        deadline = time.monotonic() + self.settings.lock_wait
        while not conn.execute(f"SELECT {function}(%s)", (DAEMON_LOCK,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"PostgreSQL.Lock: the index {self.path} is in use by another accelerator "
                    + ("(Lock is true here: this daemon wants it alone)" if self.settings.lock
                       else "that has Lock true") + '; replicas that share one database must all set '
                    '"Lock": false in their PostgreSQL section')
            time.sleep(0.1)
        self._lock_connection = conn

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()
        if self._lock_connection is not None:
            self._lock_connection.close()
            self._lock_connection = None

    # -- connections and transactions ----------------------------------------------------------

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """Errors of the server or the link as the errors Orthanc answers; conflicts pass
        through to the transaction's retry loop."""
        try:
            yield
        except (SerializationFailure, DeadlockDetected):
            raise
        except DiskFull as exc:
            raise FullStorage(f"The PostgreSQL index cannot grow: {str(exc).strip()}") from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL index {self.path}: {str(exc).strip() or type(exc).__name__}") \
                from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        with self._database_errors(), self._pool.connection(timeout=self.connection_wait) as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._connection() as conn:
            yield _Connection(conn)

    def _run_transaction(self, work: Callable[[_Connection], T]) -> T:
        pause = FIRST_PAUSE
        for attempt in range(self.retries + 1):
            try:
                with self._connection() as conn, conn.transaction():
                    return work(_Connection(conn))
            except (SerializationFailure, DeadlockDetected) as exc:
                if attempt == self.retries:
                    raise DatabaseCannotSerialize(
                        f"{type(exc).__name__} in {attempt + 1} attempt(s): {str(exc).strip()}") from None
                log.info("index transaction rerun after %s (attempt %d)", type(exc).__name__, attempt + 1)
                time.sleep(pause * (0.5 + random.random()))  # jitter: two replicas do not collide again
                pause = min(pause * 2, LONGEST_PAUSE)
        raise AssertionError("unreachable")

    def _rows(self, sql: str, params: tuple, batch: int) -> Iterator[tuple]:
        """A server-side cursor: `batch` rows in memory at a time, whatever the table's size."""
        with self._connection() as conn, conn.transaction():
            with conn.cursor(name="accelerator_scan") as cursor:
                cursor.itersize = batch
                cursor.execute(_placeholders(sql), params)
                while rows := cursor.fetchmany(batch):
                    yield from rows

    # -- dialect -------------------------------------------------------------------------------

    def _last_seq(self, c) -> int:
        # The identity's sequence: never reused, even by rolled back inserts (gaps are possible).
        return c.execute(
            "SELECT coalesce(pg_sequence_last_value(CAST(pg_get_serial_sequence('changes', 'seq') AS regclass)), 0)"
        ).fetchone()[0]

    @staticmethod
    def _main_tag_param(keyword: str) -> str:
        return keyword

    @staticmethod
    def _encode_json(value: object) -> str:
        return orjson.dumps(value).decode()
