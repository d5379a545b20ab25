#!/bin/sh
# The control image's entrypoint (Dockerfile, target `control`). The image defaults to TRAINOPS_MODE=prod:
# a prod process does not start without its secrets, and a dev process (built-in admin token, embedded
# SQLite) listens on loopback only unless explicitly allowed otherwise. It exports TRAINOPS_API_HOST, the
# address the image's CMD, docker-compose.yml's api and `trainops up` bind, then runs the command.
set -eu

mode="${TRAINOPS_MODE:-prod}"
generate="python -c 'import secrets; print(secrets.token_urlsafe(32))'"

case "$mode" in
prod)
    missing=""
    if [ -z "${TRAINOPS_BOOTSTRAP_ADMIN_TOKEN:-}" ]; then
        missing="$missing
  TRAINOPS_BOOTSTRAP_ADMIN_TOKEN  a random admin secret of at least 32 characters: $generate"
    fi
    if [ -z "${TRAINOPS_DATABASE_URL:-}" ]; then
        missing="$missing
  TRAINOPS_DATABASE_URL           the PostgreSQL database: postgresql+psycopg://USER:PASSWORD@HOST:5432/DB"
    fi
    if [ -n "$missing" ]; then
        echo "trainops: refusing to start in prod mode (the image's default) without:$missing
(TRAINOPS_MODE=dev runs the embedded mode, loopback only; see docs/deployment.md)" >&2
        exit 78
    fi
    # The container's own interface: what reaches it is decided by the ports the deployment publishes.
    TRAINOPS_API_HOST="${TRAINOPS_API_HOST:-0.0.0.0}"
    ;;
dev)
    TRAINOPS_API_HOST="${TRAINOPS_API_HOST:-127.0.0.1}"
    case "$TRAINOPS_API_HOST" in
    127.* | localhost | ::1) ;;
    *)
        # Dev mode accepts the built-in admin token that anyone can read in the source.
        if [ "${TRAINOPS_DEV_ALLOW_NETWORK:-}" != "1" ]; then
            echo "trainops: dev mode may run with the built-in admin token, so it listens on loopback only;" \
                "TRAINOPS_API_HOST=$TRAINOPS_API_HOST is refused. Run in prod mode, or set" \
                "TRAINOPS_DEV_ALLOW_NETWORK=1 to expose it anyway." >&2
            exit 78
        fi
        ;;
    esac
    ;;
*)
    echo "trainops: TRAINOPS_MODE=$mode: expected prod or dev" >&2
    exit 78
    ;;
esac

export TRAINOPS_MODE="$mode" TRAINOPS_API_HOST
exec "$@"
