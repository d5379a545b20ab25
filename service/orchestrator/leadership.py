"""Which of several orchestrators on one database leads: exactly one reconciles, the others stand by.

PostgreSQL (`PostgresLeadership`): the leader holds a session advisory lock (`pg_try_advisory_lock`) on a
connection of its own. PostgreSQL releases the lock when that session ends: at once when the process dies
(its kernel closes the socket), within `leader_lease_s` when its host or network vanishes (the session's
TCP keepalives and user timeout are set from the lease) or its process stops (`idle_session_timeout`: the
leader renews its session from a thread, a stopped process cannot). Standbys try the lock once per loop
interval.

Fencing: holding the lock is not enough, a leader can lose it between deciding and acting. So every write
transaction of the orchestrator (`fenced_sessions`) and every side effect outside the database (`fenced`:
a launch, a kill, a cordon) first takes a *shared* transaction-level advisory lock (the fence) and checks,
in that transaction, that the leader lock is still granted to this process's lock session (its backend pid
and start time in `pg_locks`/`pg_stat_activity`). A new leader, once it holds the leader lock, takes the
fence lock *exclusively* for a moment before its first pass: that waits out every fenced step the previous
leader had in flight, and any step it begins afterwards fails its check. So a deposed leader never changes
run state, launches or kills after another took over (`LeadershipLost` aborts its pass), and no schema
change is needed.

The fence is held on pooled connections, so it gets the lock session's lease for as long as it is held
(`fence` sets them in its transaction): TCP keepalives and `tcp_user_timeout` from the lease, and
`idle_in_transaction_session_timeout` = the lease, which a fenced side effect renews from a thread
(`keep_fence`) while its process runs. A leader stopped (SIGSTOP) or cut off inside a fenced step thus frees
the fence within the lease, as it frees the leader lock. Should a fence holder outlive that anyway (a
statement stuck mid-flight, an older orchestrator), the new leader waits for it at most the lease
(`lock_timeout`), then ends its session (`pg_terminate_backend`) and says so in its takeover's evidence.

SQLite (embedded mode) supports one orchestrator: `SqliteLeadership` holds an OS file lock next to the
database file and a second orchestrator refuses to start (`LeadershipRefused`) naming the one that runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from service.crud.orchestrators import (
    APPLICATION_NAME,
    FENCE_LOCK,
    LEADER_LOCK,
    LEADER_SESSION_SQL,
    LOCK_NAMESPACE,
    sqlite_lock_path,
)

log = logging.getLogger("trainops.orchestrator")

_FENCE_SHARED = sa.text(
    "SELECT set_config('idle_in_transaction_session_timeout', :timeout, true),"
    " set_config('tcp_user_timeout', :timeout, true),"
    " set_config('tcp_keepalives_idle', :idle, true),"
    " set_config('tcp_keepalives_interval', :interval, true),"
    " set_config('tcp_keepalives_count', :count, true),"
    f" pg_advisory_xact_lock_shared({LOCK_NAMESPACE}, {FENCE_LOCK})"
)
"""The shared fence, its session given the lock session's lease for this transaction only (`set_config`'s
`is_local`); one round trip, as every fenced write pays it."""
_FENCE_HOLDERS_SQL = f"""
    SELECT a.pid, a.application_name, host(a.client_addr) AS client, a.state, a.backend_start, a.query
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.pid <> pg_backend_pid()
      AND l.classid::bigint = {LOCK_NAMESPACE} AND l.objid::bigint = {FENCE_LOCK}
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
"""The other sessions holding the fence: a (deposed) leader's fenced steps."""
_FENCE_CHECK = sa.text(
    f"SELECT EXISTS ({LEADER_SESSION_SQL} AND a.pid = :pid AND a.backend_start = :backend_start)"
)


class LeadershipLost(RuntimeError):
    """This orchestrator does not (or no longer) lead: the step it was about to take was not taken."""


class LeadershipRefused(RuntimeError):
    """This orchestrator may not run at all (SQLite: another orchestrator holds the database)."""


@dataclass(frozen=True)
class Holder:
    """An orchestrator process: where it runs."""

    host: str
    pid: int

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"

    @property
    def application_name(self) -> str:
        # PostgreSQL keeps 63 bytes of it; a host name that long is cut, the pid always fits first
        return f"{APPLICATION_NAME} pid={self.pid} host={self.host}"[:63]

    @classmethod
    def from_application_name(cls, name: str | None) -> Holder | None:
        if not name or not name.startswith(APPLICATION_NAME):
            return None
        fields = dict(part.split("=", 1) for part in name.split()[1:] if "=" in part)
        try:
            return cls(host=fields.get("host", "?"), pid=int(fields["pid"]))
        except (KeyError, ValueError):
            return None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid())


@dataclass(frozen=True)
class LeadershipChange:
    """What `Leadership.poll` found changed: this process took the lead, or lost it."""

    acquired: bool
    holder: Holder
    previous: Holder | None = None
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...

    def poll(self) -> LeadershipChange | None:
        """A standby tries to take the lead, a leader checks it still holds it; returns what changed."""
        ...

    def fence(self, connection: Connection, what: str) -> None:
        """Inside a transaction on `connection`: raise `LeadershipLost` unless this process leads, and keep
        a new leader from starting until the transaction ends."""
        ...

    def keep_fence(self, connection: Connection) -> AbstractContextManager[None]:
        """While a fenced side effect runs: keep the fence's session from timing out as long as this
        process runs (a stopped or vanished one frees the fence within the lease)."""
        ...

    def release(self) -> None:
        """Step down (at shutdown): a standby takes over at its next poll."""
        ...


def fenced(leadership: Leadership | None, engine: Engine, what: str) -> AbstractContextManager[None]:
    """A side effect outside the database (launch, kill, cordon) runs inside this block only while this
    process leads; a new leader waits for the block to end (at most the lease: then it ends the block's
    session, `_wait_out_fence`). Nothing inside may open a fenced transaction of its own (it would queue
    behind a waiting new leader that waits for this block)."""
    if leadership is None:
        return nullcontext()
    return _fenced_block(leadership, engine, what)


@contextmanager
def _fenced_block(leadership: Leadership, engine: Engine, what: str) -> Iterator[None]:
    with engine.connect() as connection, connection.begin():
        leadership.fence(connection, what)
        with leadership.keep_fence(connection):
            yield


def fenced_sessions(factory: sessionmaker[Session], leadership: Leadership) -> sessionmaker[Session]:
    """A session factory on the same engine whose transactions commit a write only while this process
    leads: the fence is checked in the transaction itself, just before it commits. Read-only transactions
    are not checked (observing changes nothing)."""
    fenced_factory: sessionmaker[Session] = sessionmaker(**factory.kw)
    wrote = "trainops_wrote"

    def mark_write(state: ORMExecuteState) -> None:
        statement = state.statement
        if isinstance(statement, sa.TextClause):
            if not statement.text.lstrip()[:6].upper().startswith(("SELECT", "WITH")):
                state.session.info[wrote] = True
        elif not state.is_select:
            state.session.info[wrote] = True

    def mark_flush(session: Session, _flush_context: object) -> None:
        session.info[wrote] = True

    def check_before_commit(session: Session) -> None:
        session.flush()
        if session.info.pop(wrote, False):
            leadership.fence(session.connection(), "commit")

    def forget(session: Session, _transaction: object) -> None:
        session.info.pop(wrote, None)

    sa.event.listen(fenced_factory, "do_orm_execute", mark_write)
    sa.event.listen(fenced_factory, "after_flush", mark_flush)
    sa.event.listen(fenced_factory, "before_commit", check_before_commit)
    sa.event.listen(fenced_factory, "after_soft_rollback", forget)
    return fenced_factory


# ---- PostgreSQL: a session advisory lock -------------------------------------------------------------


class PostgresLeadership:
    """The leader holds the advisory lock on a dedicated connection (never a pooled one: a pool would hand
    the session, lock and all, to other work)."""

    def __init__(self, engine: Engine, *, lease_s: float, holder: Holder | None = None) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.holder = holder or Holder.this_process()
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn: psycopg.Connection[Any] | None = None
        self._session: tuple[int, dt.datetime] | None = None
        """The lock session's backend pid and start, while this process leads."""
        self._seen_holder: Holder | None = None
        """The leader this standby saw last: the previous holder once it takes over."""
        self._renewing = threading.Event()
        """Set while the renewal thread keeps the leader's lock session busy (`_renew`)."""

    @property
    def is_leader(self) -> bool:
        return self._session is not None

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    def _keepalive(self) -> dict[str, int]:
        """TCP keepalive settings that notice a vanished peer within about the lease."""
        idle = max(1, math.ceil(self.lease_s / 2))
        count = 3
        interval = max(1, math.floor((self.lease_s - idle) / count))
        return {"idle": idle, "interval": interval, "count": count}

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            k = self._keepalive()
            conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                application_name=self.holder.application_name,
                connect_timeout=max(2, math.ceil(self.lease_s)),
                keepalives=1,
                keepalives_idle=k["idle"],
                keepalives_interval=k["interval"],
                keepalives_count=k["count"],
            )
            # The server's side of the same: it ends the session (and frees the lock) when this host
            # stops answering, so a standby can take over within the lease.
            conn.execute(f"SET tcp_keepalives_idle = {k['idle']}")
            conn.execute(f"SET tcp_keepalives_interval = {k['interval']}")
            conn.execute(f"SET tcp_keepalives_count = {k['count']}")
            conn.execute(f"SET tcp_user_timeout = {self.lease_ms}")
            # A leader whose process stops (SIGSTOP, a VM paused, a swap storm) still answers keepalives
            # from its kernel: the session must also end when it stays silent for the lease. The leader
            # renews it from a thread of its own (`_renew`), so a long pass does not end it.
            try:
                conn.execute(f"SET idle_session_timeout = {self.lease_ms}")
            except psycopg.errors.UndefinedObject:  # PostgreSQL < 14: keepalives only (docs: Failover)
                log.warning("PostgreSQL has no idle_session_timeout: a stopped leader keeps the lock")
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def current_holder(self) -> Holder | None:
        """The orchestrator that holds the leader lock now, as its lock session names it."""
        row = self._connection().execute(LEADER_SESSION_SQL).fetchone()
        return Holder.from_application_name(row[2]) if row else None

    def poll(self) -> LeadershipChange | None:
        try:
            conn = self._connection()
            if self._session is not None:
                pid, started = self._session
                row = conn.execute(
                    f"{LEADER_SESSION_SQL} AND a.pid = pg_backend_pid() AND a.backend_start = %s", (started,)
                ).fetchone()
                if row is not None:
                    return None
                return self._lost(f"the leader lock is no longer held by its session (backend pid {pid})")
            got = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, LEADER_LOCK)
            ).fetchone()
            if not got or not got[0]:
                self._seen_holder = self.current_holder() or self._seen_holder
                return None
            return self._take_over(conn)
        except psycopg.Error as error:
            self._drop_connection()
            if self._session is not None:
                return self._lost(f"its lock session failed: {error}")
            log.warning("standing by: PostgreSQL is unreachable for the leader lock: %s", error)
            return None

    def _take_over(self, conn: psycopg.Connection[Any]) -> LeadershipChange:
        waited = time.monotonic()
        terminated = self._wait_out_fence(conn)
        waited_s = time.monotonic() - waited
        row = conn.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row is not None
        self._session = (int(row[0]), row[1])
        self._renewing.set()
        threading.Thread(
            target=self._renew, args=(conn,), name="trainops-leader-renewal", daemon=True
        ).start()
        previous = self._seen_holder if self._seen_holder != self.holder else None
        return LeadershipChange(
            acquired=True,
            holder=self.holder,
            previous=previous,
            reason="took the PostgreSQL leader lock",
            evidence={
                "lock": f"pg_advisory_lock({LOCK_NAMESPACE}, {LEADER_LOCK})",
                "backend_pid": self._session[0],
                "fence_wait_s": round(waited_s, 3),
                "leader_lease_s": self.lease_s,
                **({"fence_holders_terminated": terminated} if terminated else {}),
            },
        )

    def _wait_out_fence(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        """Take the fence exclusively for a moment: wait out the previous leader's fenced steps still in
        flight (none once its process is dead). A step that keeps the fence past the lease (its session
        should have timed out by then: `fence`) is ended with its session, so that a stopped or cut-off
        leader cannot hold off the takeover; returns the sessions ended (empty: none)."""
        lock = "SELECT pg_advisory_lock(%s, %s)"
        terminated: list[dict[str, Any]] = []
        conn.execute(f"SET lock_timeout = {self.lease_ms}")
        try:
            try:
                conn.execute(lock, (LOCK_NAMESPACE, FENCE_LOCK))
            except psycopg.errors.LockNotAvailable:
                for pid, application, client, state, started, query in conn.execute(_FENCE_HOLDERS_SQL):
                    holder = {
                        "pid": pid,
                        "application_name": application,
                        "client": client,
                        "state": state,
                        "backend_start": started.isoformat() if started else None,
                        "query": (query or "")[:200],
                    }
                    log.warning(
                        "the previous leader's fenced step held the fence for longer than the lease "
                        "(%.1f s): ending its session %s",
                        self.lease_s,
                        holder,
                    )
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    terminated.append(holder)
                conn.execute(lock, (LOCK_NAMESPACE, FENCE_LOCK))  # its end frees the fence: a moment
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, FENCE_LOCK))
        finally:
            conn.execute("SET lock_timeout = 0")
        return terminated

    def _renew(self, conn: psycopg.Connection[Any]) -> None:
        """Keep the leader's lock session from going idle for the lease while this process runs; stops
        when the session is dropped (the loop's next poll tells whether the lock is still held)."""
        period = self.lease_s / 4
        while self._renewing.is_set() and self._conn is conn:
            time.sleep(period)
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                return

    def _lost(self, reason: str) -> LeadershipChange:
        self._session = None
        self._renewing.clear()
        # A session that lost the lock is not reused: it may still hold it, unknown to us, or be half-dead.
        self._drop_connection()
        return LeadershipChange(acquired=False, holder=self.holder, reason=reason)

    def fence(self, connection: Connection, what: str) -> None:
        session = self._session
        if session is None:
            raise LeadershipLost(f"not the leader: {what} not done")
        # The fence's session (a pooled one) gets the lock session's lease while it holds the fence: a
        # process stopped or cut off inside a fenced step must not keep a new leader waiting past it.
        k = self._keepalive()
        connection.execute(
            _FENCE_SHARED,
            {
                "timeout": str(self.lease_ms),
                "idle": str(k["idle"]),
                "interval": str(k["interval"]),
                "count": str(k["count"]),
            },
        )
        held = connection.execute(_FENCE_CHECK, {"pid": session[0], "backend_start": session[1]}).scalar()
        if not held:
            raise LeadershipLost(f"the leader lock is no longer this orchestrator's: {what} not done")

    @contextmanager
    def keep_fence(self, connection: Connection) -> Iterator[None]:
        """Renew the fence's session every lease/4 while the side effect runs (its transaction would
        otherwise end after the lease idle: `fence`). Thread-safe: psycopg serializes a connection's use,
        and the block's own thread does not use it until the renewals stopped."""
        driver = connection.connection.driver_connection
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 4):
                try:
                    driver.execute("SELECT 1")
                except psycopg.Error:  # the session ended: the block's commit fails and says so
                    return

        renewal = threading.Thread(target=renew, name="trainops-fence-renewal", daemon=True)
        renewal.start()
        try:
            yield
        finally:
            done.set()
            renewal.join()

    def release(self) -> None:
        self._renewing.clear()
        if self._conn is not None and self._session is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, LEADER_LOCK))
        self._session = None
        self._drop_connection()


# ---- SQLite: one orchestrator per database file --------------------------------------------------------


class SqliteLeadership:
    """An OS file lock (flock) beside the database file: released by the kernel when the process ends."""

    def __init__(self, database_path: Path | None, *, holder: Holder | None = None) -> None:
        self.database_name = database_path.name if database_path else ":memory:"
        self.lock_path = sqlite_lock_path(database_path) if database_path else None
        self.holder = holder or Holder.this_process()
        self._file: IO[str] | None = None
        self._leading = False

    @property
    def is_leader(self) -> bool:
        return self._leading

    def acquire(self) -> None:
        """Take the database for this orchestrator, or raise `LeadershipRefused` naming who has it."""
        if self._leading:
            return
        if self.lock_path is None:  # an in-memory database: no other process can reach it
            self._leading = True
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.lock_path, "a+")  # noqa: SIM115 - held open for as long as this process leads
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            other = lock_file.read().strip() or "another process"
            lock_file.close()
            raise LeadershipRefused(
                f"another orchestrator ({other}) already runs against this SQLite database "
                f"({self.database_name}); SQLite supports one "
                "orchestrator: stop that one, or move to PostgreSQL to run standbys"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{self.holder}, since {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
        lock_file.flush()
        self._file = lock_file
        self._leading = True

    def poll(self) -> LeadershipChange | None:
        if self._leading:
            return None
        self.acquire()
        return LeadershipChange(
            acquired=True,
            holder=self.holder,
            reason="took the SQLite database's orchestrator lock",
            evidence={"lock_file": str(self.lock_path) if self.lock_path else None},
        )

    def fence(self, connection: Connection, what: str) -> None:
        if not self._leading:
            raise LeadershipLost(f"not the leader: {what} not done")

    def keep_fence(self, connection: Connection) -> AbstractContextManager[None]:
        return nullcontext()  # one orchestrator per SQLite database: nobody waits for its fence

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._leading = False


def leadership_for(engine: Engine, *, lease_s: float) -> PostgresLeadership | SqliteLeadership:
    """PostgreSQL: leader and standbys; SQLite: one orchestrator, a second refuses."""
    if engine.dialect.name == "postgresql":
        return PostgresLeadership(engine, lease_s=lease_s)
    database = engine.url.database
    return SqliteLeadership(Path(database).resolve() if database and database != ":memory:" else None)
