"""An operator upgrades the schema on SQLite or PostgreSQL, and can roll it back."""

from __future__ import annotations

import sqlalchemy as sa

from service import migrate
from service.db import make_engine


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
