"""An operator upgrades the schema on SQLite or PostgreSQL, and can roll it back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import migrate
from service.db import make_engine

REPO = Path(__file__).resolve().parents[2]


def test_migrations_match_the_models_and_round_trip(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert migrate.current_revision(engine) is not None
        # autogenerate finds nothing to do: models and migrations agree
        assert migrate.schema_diff(engine) == []
    finally:
        engine.dispose()

    migrate.downgrade(db_url, "base")
    engine = make_engine(db_url)
    try:
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
    finally:
        engine.dispose()

    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert {
            "runs",
            "attempts",
            "nodes",
            "gpus",
            "diagnostics",
            "checkpoints",
            "metrics",
            "logbook",
            "api_tokens",
            "heartbeats",
        } <= set(sa.inspect(engine).get_table_names())
        assert migrate.schema_diff(engine) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert migrate.schema_diff(engine) == []
    finally:
        engine.dispose()


def _grafana_sql_panels() -> list[tuple[str, str]]:
    """(title, SQL) of every SQL target in the shipped Grafana dashboards."""
    found = []
    for board in sorted((REPO / "dashboards" / "grafana").glob("*.json")):
        for panel in json.loads(board.read_text())["panels"]:
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    found.append((f"{board.name}: {panel['title']}", target["rawSql"]))
    return found


def _as_plain_sql(sql: str, run_name: str) -> str:
    """Grafana's PostgreSQL macros, expanded the way Grafana does for a one-minute interval."""
    sql = re.sub(r"\$__timeGroupAlias\((\S+?), \$__interval\)", r"date_trunc('minute', \1) AS time", sql)
    sql = re.sub(r"\$__timeFilter\((\S+?)\)", r"\1 > now() - interval '1 day'", sql)
    return sql.replace("$run", run_name)


@pytest.mark.postgres
def test_dashboards_read_as_the_read_only_role_which_can_change_nothing(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        # what a deployment does once (docs/security.md): give the group role a login
        conn.execute(sa.text("ALTER ROLE trainops_reader LOGIN"))
        conn.execute(
            sa.text(
                "INSERT INTO runs (name, owner, config, desired_state, phase, restart_count, lr_scale,"
                " created_at, updated_at) VALUES ('opt-ro', 'alice', '{}', 'running', 'pending', 0, 1.0,"
                " now(), now())"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO logbook (run_id, time, kind, severity, author, message, evidence)"
                " SELECT id, now(), 'decision', 'warning', 'orchestrator', 'restart after crash',"
                " '{\"exit_code\": 7}'"
                " FROM runs WHERE name = 'opt-ro'"
            )
        )
    engine.dispose()
    reader = make_engine(postgres_url.replace("postgres@", "trainops_reader@", 1))
    panels = _grafana_sql_panels()
    assert len(panels) >= 4  # loss, validation perplexity, loss scale, activation norm
    try:
        with reader.connect() as conn:
            results = {}
            for title, sql in panels:
                try:
                    results[title] = conn.execute(sa.text(_as_plain_sql(sql, "opt-ro"))).mappings().all()
                except sa.exc.DBAPIError as exc:
                    pytest.fail(f"{title}: {exc}")
            # The on-call logbook table names the run and shows the entry with its evidence.
            (entry,) = results["oncall.json: Logbook"]
            assert (entry["run"], entry["severity"], entry["message"]) == (
                "opt-ro",
                "warning",
                "restart after crash",
            )
            assert entry["evidence"] == {"exit_code": 7} and entry["node"] is None
            assert conn.execute(sa.text("SELECT name FROM runs")).scalars().all() == ["opt-ro"]
        for statement in (
            "SELECT * FROM api_tokens",
            "UPDATE runs SET owner = 'mallory'",
            "DELETE FROM metrics",
            "DROP TABLE logbook",
            "CREATE TABLE x (id int)",
        ):
            with (
                reader.connect() as conn,
                pytest.raises(sa.exc.ProgrammingError, match=r"permission denied|must be owner"),
            ):
                conn.execute(sa.text(statement))
    finally:
        reader.dispose()

    migrate.downgrade(postgres_url, "0005")  # the grants go with the revision
    reader = make_engine(postgres_url.replace("postgres@", "trainops_reader@", 1))
    try:
        with reader.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text("SELECT name FROM runs"))
    finally:
        reader.dispose()
