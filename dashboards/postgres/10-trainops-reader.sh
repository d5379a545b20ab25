#!/usr/bin/env bash
# The postgres image runs this once, when it initialises an empty data directory (docker-compose.yml mounts
# it into /docker-entrypoint-initdb.d/). It gives the read-only role trainops_reader a login and the password
# Grafana's datasource uses (GRAFANA_DB_PASSWORD). Migration 0006 (run later by `trainops db upgrade`) grants
# the role SELECT on what dashboards read; it creates the role NOLOGIN only where it does not exist yet.
#
# Idempotent: re-running it sets the password again. psql takes PGHOST/PGPORT from the environment (the
# image's entrypoint uses the local socket). TRAINOPS_READER_ROLE names another role: for tests only, as
# migration 0006 grants to trainops_reader.
set -euo pipefail

: "${GRAFANA_DB_PASSWORD:?set GRAFANA_DB_PASSWORD, the password the Grafana datasource logs in with as trainops_reader}"
reader_role="${TRAINOPS_READER_ROLE:-trainops_reader}"

# The password goes in as a psql variable, quoted by format(%L): any character is safe, none reaches a shell.
psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set reader_role="$reader_role" --set reader_password="$GRAFANA_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I NOLOGIN', :'reader_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader_role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'reader_role', :'reader_password') \gexec
SQL
