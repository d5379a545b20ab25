"""read-only role: what Grafana (and any other dashboard or analyst) connects as, on PostgreSQL

Grafana's SQL panels need to read metrics and run history; they used to connect as the database owner,
which can also rewrite or drop every table and read the API tokens' hashes. This revision makes the group
role ``trainops_reader`` (created NOLOGIN when missing; a deployment gives it a login and password, or
grants it to a login role of its own, see docs/security.md) and grants it SELECT on the tables that
dashboards read. Never on ``api_tokens``. A later revision that adds a table dashboards read grants it
there too (no default privileges: a new table is private until someone decides otherwise).

Nothing happens on SQLite (no roles). Where the migrating user may not create roles and the role does
not exist, the revision notes it and grants nothing: the schema is still correct, and the deployment
creates the role and re-runs the grants (`trainops db upgrade` after `CREATE ROLE trainops_reader`
does nothing twice; see docs/security.md for the statements).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READER_ROLE = "trainops_reader"
# What dashboards read. Not api_tokens (secrets' hashes), not alembic_version.
READABLE_TABLES = (
    "runs",
    "attempts",
    "metrics",
    "checkpoints",
    "logbook",
    "nodes",
    "gpus",
    "node_offences",
    "diagnostics",
    "heartbeats",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    tables = ", ".join(READABLE_TABLES)
    # CREATE ROLE is cluster-wide: another database of the same cluster (or a concurrent migration) may
    # have made it already; a migrating user without CREATEROLE leaves it to the deployment.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                BEGIN
                    CREATE ROLE {READER_ROLE} NOLOGIN;
                EXCEPTION
                    WHEN duplicate_object OR unique_violation THEN NULL;
                    WHEN insufficient_privilege THEN
                        RAISE NOTICE 'role {READER_ROLE} does not exist and this user may not create it: '
                            'no read-only grants made (docs/security.md)';
                END;
            END IF;
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                EXECUTE format('GRANT CONNECT ON DATABASE %I TO {READER_ROLE}', current_database());
                GRANT USAGE ON SCHEMA public TO {READER_ROLE};
                GRANT SELECT ON {tables} TO {READER_ROLE};
            END IF;
        END
        $$;
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    tables = ", ".join(READABLE_TABLES)
    # The role itself stays: it is cluster-wide and other databases may use it.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                REVOKE SELECT ON {tables} FROM {READER_ROLE};
                REVOKE USAGE ON SCHEMA public FROM {READER_ROLE};
                EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {READER_ROLE}', current_database());
            END IF;
        END
        $$;
        """
    )
