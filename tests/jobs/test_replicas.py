"""Jobs shared by replicas (accelerator.jobs.engine with a shared index): two engines in one
process, each with its own index connection to the same database (real PostgreSQL; SQLite too,
two connections to one file, with `shared=True`), as two daemons behind a load balancer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack

import anyio
import orjson
import pytest

from accelerator.jobs.engine import FAILURE, PAUSED, PENDING, RUNNING, SUCCESS, JobsEngine
from accelerator.store.index import Index, JobEdit
from protocol.errors import BadRequest, UnknownResource
from tests.jobs.fakes import TYPE, FakeDriver

pytestmark = pytest.mark.anyio

LEASE = 1.5  # seconds: short, so that a take-over happens within the tests' bounds
WAIT = 10  # seconds: bound of every wait below (several leases)


@pytest.fixture
def open_index(index_kind, tmp_path, request) -> Iterator[Callable[[], object]]:
    """Opens one more connection to this test's shared index (one per replica)."""
    opened = []
    if index_kind == "postgresql":
        from accelerator.store.postgres_index import PostgresIndex, PostgresSettings

        server = request.getfixturevalue("postgres_server")
        settings = PostgresSettings(host=server.host, port=server.port, database=server.create_database(),
                                    username=server.user, maximum_connection_retries=0,
                                    index_connections_count=4, lock=False)

        def make():
            opened.append(PostgresIndex(settings))
            assert opened[-1].shared
            return opened[-1]
    else:
        def make():
            opened.append(Index(tmp_path / "index"))
            assert not opened[-1].shared  # SQLite is one daemon's: the tests force `shared`
            return opened[-1]
    yield make
    for index in opened:
        index.close()


def _replica(index, **options) -> tuple[JobsEngine, FakeDriver]:
    engine = JobsEngine(index, shared=True, lease=LEASE, **options)
    driver = FakeDriver()
    engine.register(TYPE, driver.factory)
    return engine, driver


async def _eventually(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Poll `check` (every 20 ms, at most `timeout` seconds) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.02)


async def _state_on(engine: JobsEngine, job_id: str, *states: str) -> dict:
    with anyio.fail_after(WAIT):
        return await engine.wait(job_id, states)


async def _submit(engine: JobsEngine, do: str = "wait", priority: int = 0) -> str:
    return await engine.submit(TYPE, {"do": do}, priority, {"Peer": "b"})


# -- the index's primitives ---------------------------------------------------------------------

def test_claims_at_once_take_different_jobs(open_index):
    """Replicas claiming at the same moment (threads, each with its own connection) never
    take the same job, and together take them all, best first."""
    indexes = [open_index() for _ in range(4)]
    for n in range(12):
        indexes[0].insert_job(f"job-{n:02}", TYPE, n % 3, PENDING, orjson.dumps({"n": n}))
    claimed: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(indexes))

    def claim(index, owner: str) -> None:
        barrier.wait(timeout=WAIT)
        claimed[owner] = [row.id for row in index.claim_jobs(owner, 3, 60)]

    threads = [threading.Thread(target=claim, args=(index, f"replica-{i}")) for i, index in enumerate(indexes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    taken = [job for jobs in claimed.values() for job in jobs]
    assert len(claimed) == 4 and sorted(taken) == [f"job-{n:02}" for n in range(12)]
    owners = {row.id: row.owner for row in indexes[1].job_rows()}
    assert all(owners[job] == owner for owner, jobs in claimed.items() for job in jobs)
    assert indexes[2].claim_jobs("replica-late", 5, 60) == []  # every lease is alive


def test_a_lease_that_ran_out_moves_the_job_and_fences_the_old_owner(open_index):
    first, second = open_index(), open_index()
    first.insert_job("job", TYPE, 0, PENDING, b"{}")
    assert [row.id for row in first.claim_jobs("a", 5, 0.3)] == ["job"]
    assert first.renew_jobs("a", ["job"], 0.3) == {"job": None}
    assert second.claim_jobs("b", 5, 60) == []  # "a" is alive
    time.sleep(0.5)  # "a" stalls past its lease
    [row] = second.claim_jobs("b", 5, 60)
    assert (row.id, row.owner, row.live) == ("job", "a", False)
    assert first.update_job("job", RUNNING, b'{"by": "a"}', owner="a") is False
    assert first.renew_jobs("a", ["job"], 60) == {}  # "a" learns it lost the job
    assert second.update_job("job", RUNNING, b'{"by": "b"}', owner="b") is True
    [now] = first.job_rows()
    assert (now.owner, now.live, now.state, now.record) == ("b", True, RUNNING, {"by": "b"})


def test_a_request_reaches_the_owner_and_a_release_hands_it_back(open_index):
    index = open_index()
    index.insert_job("job", TYPE, 0, RUNNING, b"{}", owner="a", lease=60)
    index.modify_job("job", lambda row: JobEdit(request="pause"))
    assert index.job_row("job").request == "pause"
    assert index.renew_jobs("a", ["job"], 60) == {"job": "pause"}
    assert index.job_row("job").request is None
    index.modify_job("job", lambda row: JobEdit(request="cancel"))
    assert index.release_job("job", SUCCESS, b"{}", "b") == (False, None)  # not b's
    assert index.release_job("job", SUCCESS, b"{}", "a") == (True, "cancel")
    row = index.job_row("job")
    assert (row.state, row.owner, row.live, row.request) == (SUCCESS, None, False, None)
    assert index.job_row("unknown") is None


def test_postgresql_index_of_version_4_upgrades_and_its_jobs_are_claimable(postgres_server):
    """The jobs step of the PostgreSQL schema: an index written at version 4 is refused, then
    upgraded in place; its jobs rows (no owner) are then claimed like any."""
    import psycopg

    from accelerator.store import schema
    from accelerator.store.postgres_index import PostgresIndex, PostgresSettings
    from protocol.errors import IndexVersionError

    database = postgres_server.create_database()
    with psycopg.connect(postgres_server.conninfo(database), autocommit=True) as conn:
        conn.execute(schema._POSTGRES_VERSION_4)
        conn.execute("INSERT INTO schema_version VALUES (4)")
        conn.execute("INSERT INTO jobs(id, type, priority, state, record) VALUES"
                     " ('left-running', %s, 0, 'Running', '{}'), ('done', %s, 0, 'Success', '{}')", (TYPE, TYPE))
    settings = PostgresSettings(host=postgres_server.host, port=postgres_server.port, database=database,
                                username=postgres_server.user, maximum_connection_retries=0,
                                index_connections_count=2, lock=False)
    with pytest.raises(IndexVersionError, match="accelerator serve --upgrade"):
        PostgresIndex(settings)
    index = PostgresIndex(settings, upgrade=True)
    try:
        assert [(r.id, r.state, r.owner) for r in index.job_rows()] == [
            ("left-running", RUNNING, None), ("done", SUCCESS, None)]
        # Running and nobody's: left so by a daemon that had the index alone, resumed by a replica
        assert [r.id for r in index.claim_jobs("replica", 5, 60)] == ["left-running"]
    finally:
        index.close()
    with psycopg.connect(postgres_server.conninfo(database)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(schema.SCHEMA_VERSION,)]


# -- two engines ----------------------------------------------------------------------------------

async def test_each_job_runs_once_and_both_replicas_show_it(open_index):
    a, driver_a = _replica(open_index(), concurrent_jobs=2)
    b, driver_b = _replica(open_index(), concurrent_jobs=2)
    async with a.running(), b.running():
        jobs = [await _submit(a) for _ in range(5)]  # 2 held by a at once, 3 left to claims
        await _eventually(lambda: len(driver_a.running | driver_b.running) == 4,
                          "both replicas run two jobs")
        assert len(driver_a.running) == 2 and len(driver_b.running) == 2
        assert sorted(await a.fetch_ids()) == sorted(await b.fetch_ids()) == sorted(jobs)
        for job_id in jobs:
            driver_a.release(job_id)
            driver_b.release(job_id)
        for job_id in jobs:
            answer = await _state_on(b, job_id, SUCCESS)
            assert answer["Progress"] == 100 and answer["Content"]["Step"] == 1
            assert (await a.fetch(job_id))["State"] == SUCCESS
        listed_a, listed_b = await a.fetch_all(), await b.fetch_all()
        assert [j["ID"] for j in listed_a] == [j["ID"] for j in listed_b] == sorted(jobs)
        assert all(j["State"] == SUCCESS for j in listed_a + listed_b)
    starts = [job for job, _ in driver_a.starts + driver_b.starts]
    assert sorted(starts) == sorted(jobs), "every job started exactly once, on one replica"
    assert driver_a.max_running <= 2 and driver_b.max_running <= 2


async def test_a_job_of_a_killed_replica_is_taken_over_from_its_checkpoint(open_index):
    a, driver_a = _replica(open_index(), release_at_exit=False)  # stops as kill -9 would
    b, driver_b = _replica(open_index())
    async with b.running():
        async with a.running():
            job_id = await _submit(a)
            await driver_a.entered(job_id)  # checkpoint {"step": 1} saved by a
            await anyio.sleep(2 * LEASE)  # a renews: b must not take it meanwhile
            assert driver_b.starts == [] and (await b.fetch(job_id))["State"] == RUNNING
        stopped = time.monotonic()
        await driver_b.entered(job_id)
        took = time.monotonic() - stopped
        assert driver_b.starts == [(job_id, {"step": 1})], "resumed from a's checkpoint"
        assert LEASE / 3 < took < 2 * LEASE, took
        answer = await b.fetch(job_id)
        assert (answer["State"], answer["Content"]["Step"]) == (RUNNING, 2)
        driver_b.release(job_id)
        assert (await _state_on(b, job_id, SUCCESS))["Content"]["Step"] == 2
    assert [job for job, _ in driver_a.starts] == [job_id]


async def test_a_replica_that_stops_gives_its_jobs_back_at_once(open_index):
    a, driver_a = _replica(open_index())
    b, driver_b = _replica(open_index())
    b_stack = AsyncExitStack()
    async with a.running():
        await b_stack.enter_async_context(b.running())
        try:
            job_id = await _submit(b)
            await driver_b.entered(job_id)
        finally:
            await b_stack.aclose()  # a clean stop: the job is given back, Pending
        with anyio.fail_after(LEASE / 3 + 1):  # a's next round, not b's lease
            await driver_a.entered(job_id)
        assert driver_a.starts == [(job_id, {"step": 1})]
        driver_a.release(job_id)
        await _state_on(a, job_id, SUCCESS)


async def test_control_of_a_job_held_by_the_other_replica(open_index):
    a, driver_a = _replica(open_index())
    b, driver_b = _replica(open_index())
    async with a.running(), b.running():
        job_id = await _submit(a)
        await driver_a.entered(job_id)
        with pytest.raises(BadRequest, match="only a paused job"):
            await b.resume(job_id)
        with pytest.raises(BadRequest, match="only a failed"):
            await b.resubmit(job_id)
        with pytest.raises(BadRequest, match="Unknown job"):
            await b.pause("no-such-job")
        with pytest.raises(UnknownResource):
            await b.fetch("no-such-job")

        await b.pause(job_id)  # a acts on it at its next renewal
        await _state_on(b, job_id, PAUSED)
        assert (await a.fetch(job_id))["State"] == PAUSED and not driver_a.running

        await b.resume(job_id)  # nobody holds a paused job: b makes it Pending, a or b runs it
        await _eventually(lambda: driver_a.running | driver_b.running, "the resumed job runs again")
        starts = driver_a.starts + driver_b.starts
        assert sorted(starts, key=str) == sorted([(job_id, None), (job_id, {"step": 1})], key=str)
        runner, other = (a, b) if driver_a.running else (b, a)

        await other.cancel(job_id)
        canceled = await _state_on(other, job_id, FAILURE)
        assert (canceled["ErrorCode"], canceled["ErrorDescription"]) == (37, "This job was canceled")
        await _eventually(lambda: driver_a.discards + driver_b.discards, "the canceled job discarded")
        assert len(driver_a.discards + driver_b.discards) == 1
        assert (await runner.fetch(job_id))["State"] == FAILURE

        await other.resubmit(job_id)  # nobody holds it after the discard: Pending from nothing
        await _eventually(lambda: driver_a.running | driver_b.running, "the resubmitted job runs")
        starts = driver_a.starts + driver_b.starts
        assert len(starts) == 3 and [checkpoint for _, checkpoint in starts].count(None) == 2
        driver_a.release(job_id)
        driver_b.release(job_id)
        await _state_on(a, job_id, SUCCESS)


async def test_pending_jobs_controlled_through_the_index(open_index):
    """A job left Pending in the index (every slot busy) is paused, resumed and canceled by
    the replica asked, without any replica holding it."""
    a, driver_a = _replica(open_index(), concurrent_jobs=1)
    async with a.running():
        busy = await _submit(a)
        await driver_a.entered(busy)
        queued = await _submit(a)
        assert (await a.fetch(queued))["State"] == PENDING and a.list_ids() == [busy]
        await a.pause(queued)
        assert (await a.fetch(queued))["State"] == PAUSED
        await a.resume(queued)
        assert (await a.fetch(queued))["State"] == PENDING
        await a.cancel(queued)
        assert (await _state_on(a, queued, FAILURE))["ErrorCode"] == 37
        await _eventually(lambda: driver_a.discards == [(queued, None)], "the canceled job discarded")
        driver_a.release(busy)
        await _state_on(a, busy, SUCCESS)
    assert [job for job, _ in driver_a.starts] == [busy]


async def test_history_bound_over_every_replica(open_index):
    a, _ = _replica(open_index(), history_size=2)
    b, _ = _replica(open_index(), history_size=2)
    async with a.running(), b.running():
        done = []
        for engine in (a, b, a, b):
            job_id = await _submit(engine, "succeed")
            await _state_on(engine, job_id, SUCCESS)
            done.append(job_id)
        with anyio.fail_after(WAIT):
            while sorted(await a.fetch_ids()) != sorted(done[2:]):
                await anyio.sleep(0.05)
        assert sorted(await b.fetch_ids()) == sorted(done[2:])


# -- two daemons, one killed -------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_of_the_replica_running_a_pull(tmp_path, postgres_server, s3_server):
    """Two replicas (daemons sharing a PostgreSQL index and an S3 bucket) and a source daemon
    behind a proxy that slows every bucket down. The pull, submitted to the first replica,
    runs there; `kill -9` of that replica mid-way: the second takes the job over once the lease
    runs out, finishes it, and every instance is stored once, byte-identical."""
    import os
    import signal

    from bench.harness import Daemon, free_port
    from tests.conftest import object_storage_section, postgresql_section
    from tests.faultproxy import Fault, FaultProxy
    from tests.transfers.pair import Node
    from tests.transfers.test_restart import BUCKETS, OPTIONS, STALL, dataset

    lease = 3
    shared = {**postgresql_section(postgres_server, Lock=False), **object_storage_section(s3_server),
              "JobsLease": lease, **OPTIONS}
    port_source = free_port()

    def stall_chunks(method, path, attempt):
        return Fault.stall(STALL) if method == "GET" and path.startswith("/transfers/chunks/") else None

    def replica(name: str) -> Daemon:
        return Daemon({**shared, "HttpPort": free_port(), "OrthancPeers": {"source": {"Url": proxy.url}}},
                      tmp_path / name)

    with FaultProxy(f"http://127.0.0.1:{port_source}", stall_chunks) as proxy, \
            Daemon({"HttpPort": port_source, **OPTIONS}, tmp_path / "source") as source_daemon, \
            replica("one") as one_daemon, replica("two") as two_daemon:
        source, one, two = Node(source_daemon), Node(one_daemon), Node(two_daemon)
        study = source.upload(dataset("2.1.9"))[0]["ParentStudy"]
        job_id = one.start("pull", "source", [{"Level": "Study", "ID": study}], "gzip")["ID"]
        assert two.job(job_id)["State"] in ("Pending", "Running")  # the same job, seen from two

        deadline = time.monotonic() + 30
        while one.job(job_id)["Content"].get("CompletedHttpQueries", 0) < BUCKETS // 3:
            assert one.job(job_id)["State"] == "Running" and time.monotonic() < deadline
            time.sleep(0.02)
        assert two.job(job_id)["State"] == "Running"
        os.killpg(one_daemon.pid, signal.SIGKILL)
        one_daemon.proc.wait(10)
        killed = time.monotonic()
        one.close()

        job = two.wait(job_id, timeout=60)
        assert job["State"] == "Success", job
        assert time.monotonic() - killed > lease / 2  # taken over after the lease, not before
        assert sorted(two.http.get("/jobs").json()) == [job_id]
        assert two.md5s() == source.md5s()
        assert two.statistics()["CountInstances"] == source.statistics()["CountInstances"]
        assert proxy.count("POST", "/transfers/lookup") == 1  # resumed from the checkpoint's plan
        log = two_daemon.stderr_tail(20_000)
        assert "taken over from replica" in log, log
        source.close()
        two.close()
