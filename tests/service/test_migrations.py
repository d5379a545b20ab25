"""An operator upgrades the schema on SQLite or PostgreSQL, and can roll it back."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import migrate
from service.db import make_engine, make_session_factory, transaction
from service.models import LogEntry, Metric, Run

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


def test_runs_that_trained_in_the_old_fp16_are_renamed_fp16_mixed(db_url: str) -> None:
    """An operator upgrades a control plane whose runs were created when `precision: fp16` meant fp16 compute
    over fp32 master weights (scale from 65536). Left as fp16, such a run's next relaunch would resume its
    checkpoints in OPT's format, which the trainer refuses (exit 2), and fail for good. Migration 0011
    renames the runs whose metrics prove the old meaning, each with a logbook entry; no others."""
    migrate.upgrade(db_url, "0010")
    engine = make_engine(db_url)
    first_scales = {"old": 65536.0, "old-default": 32768.0, "opt": 4.0, "own-scale": 65536.0, "bf16": 1.0}
    configs = {
        "old": {"precision": "fp16"},
        "old-default": {},  # precision unset: fp16, the default then and now
        "opt": {"precision": "fp16"},
        "own-scale": {"precision": "fp16", "hyperparameters": {"initial_loss_scale": 65536.0}},
        "bf16": {"precision": "bf16"},
        "never-ran": {"precision": "fp16"},
    }
    try:
        with transaction(make_session_factory(engine)) as session:
            for name, config in configs.items():
                run = Run(name=name, owner="alice", config=config)
                session.add(run)
                session.flush()
                if name in first_scales:
                    for step, scale in ((1, first_scales[name]), (2, first_scales[name] / 2)):
                        session.add(
                            Metric(
                                run_id=run.id,
                                attempt=1,
                                step=step,
                                time=dt.datetime.now(dt.UTC),
                                loss_scale=scale,
                            )
                        )
    finally:
        engine.dispose()

    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            precision = {r.name: r.config.get("precision") for r in session.scalars(sa.select(Run))}
            entries = {e.run_id: e for e in session.scalars(sa.select(LogEntry))}
            ids = {r.name: r.id for r in session.scalars(sa.select(Run))}
    finally:
        engine.dispose()
    assert precision == {
        "old": "fp16-mixed",
        "old-default": "fp16-mixed",
        "opt": "fp16",
        "own-scale": "fp16",
        "bf16": "bf16",
        "never-ran": "fp16",
    }
    assert set(entries) == {ids["old"], ids["old-default"]}
    entry = entries[ids["old"]]
    assert entry.author == "migration 0011" and "fp16 -> fp16-mixed" in entry.message
    assert entry.evidence == {
        "first_loss_scale": 65536.0,
        "attempt": 1,
        "step": 1,
        "configured_precision": "fp16",
    }

    # Going back before 0011 gives the renamed runs the `fp16` that revision's code reads as their format.
    migrate.downgrade(db_url, "0010")
    engine = make_engine(db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            precision = {r.name: r.config.get("precision") for r in session.scalars(sa.select(Run))}
            undone = [e.run_id for e in session.scalars(sa.select(LogEntry)) if "(downgrade)" in e.author]
    finally:
        engine.dispose()
    assert precision["old"] == precision["old-default"] == "fp16" and precision["bf16"] == "bf16"
    assert sorted(undone) == sorted([ids["old"], ids["old-default"]])
