"""The orchestrators running against a database, as the database (or the kernel) sees them.

PostgreSQL: the advisory lock the leader holds and the lock sessions' names. SQLite: the OS file lock the
one orchestrator holds beside the database file. `service/orchestrator/leadership.py` takes and fences
these locks; the scrape-time metrics read who holds them here, without importing the orchestrator.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

LOCK_NAMESPACE = 0x74724F70
"""First key of trainops' advisory locks (`pg_advisory_lock(int4, int4)`): 'trOp', unlikely to collide."""
LEADER_LOCK = 1
"""Second key of the leader lock, held by the leader's lock session for as long as it leads."""
FENCE_LOCK = 2
"""Second key of the fence: shared by each fenced step, exclusive for a moment when leadership changes."""
APPLICATION_NAME = "trainops-orchestrator"
"""Each orchestrator's lock session (leader or standby): `trainops-orchestrator pid=<pid> host=<host>`."""
SQLITE_LOCK_SUFFIX = ".orchestrator.lock"
"""SQLite: the orchestrator holds an exclusive flock on `<database file>.orchestrator.lock`."""

LEADER_SESSION_SQL = f"""
    SELECT a.pid, a.backend_start, a.application_name
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid::bigint = {LOCK_NAMESPACE} AND l.objid::bigint = {LEADER_LOCK}
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
"""The session holding the leader lock (no row: nobody leads); callers may append `AND ...` conditions."""

_COUNT_SESSIONS = sa.text(
    f"""
    SELECT
      (SELECT count(*) FROM ({LEADER_SESSION_SQL}) AS leader) AS leaders,
      (SELECT count(*) FROM pg_stat_activity
       WHERE datname = current_database() AND application_name LIKE '{APPLICATION_NAME} %') AS sessions
    """
)


def orchestrator_sessions(session: Session) -> tuple[int, int] | None:
    """(leaders, standbys) among the orchestrators running now. PostgreSQL: from the leader lock and the
    lock sessions connected; SQLite: (1, 0) while an orchestrator holds the database file's lock, else
    (0, 0); None for an in-memory database."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        database = bind.url.database
        if not database or database == ":memory:":
            return None
        return (1 if sqlite_orchestrator_running(Path(database).resolve()) else 0), 0
    row = session.execute(_COUNT_SESSIONS).one()
    leaders, sessions = int(row.leaders), int(row.sessions)
    return leaders, max(0, sessions - leaders)


def sqlite_lock_path(database: Path) -> Path:
    return Path(f"{database}{SQLITE_LOCK_SUFFIX}")


def sqlite_orchestrator_running(database: Path) -> bool:
    """Whether a process holds the SQLite database's orchestrator lock, read from the kernel's lock table
    (`/proc/locks`) without touching the lock: probing it with flock could make a starting orchestrator
    refuse. SQLite is local, so the orchestrator runs on this host."""
    try:
        st = sqlite_lock_path(database).stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    # e.g. "1: FLOCK  ADVISORY  WRITE 17339 fe:00:2147135 0 EOF" (a waiter's line has "->" after the "1:")
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any("FLOCK" in line.split() and device in line.split() for line in table.splitlines())
