#!/bin/sh
# Render the Alertmanager config from its template and the environment, then start Alertmanager.
# Only the named variables are substituted (the template also holds Go templates like {{ .Labels }}).
set -eu
: "${PAGERDUTY_ROUTING_KEY:?set PAGERDUTY_ROUTING_KEY}"
: "${SLACK_WEBHOOK_URL:?set SLACK_WEBHOOK_URL}"
: "${ONCALL_WEBHOOK_URL:?set ONCALL_WEBHOOK_URL}"
out="${ALERTMANAGER_CONFIG_OUT:-/tmp/alertmanager.yml}"
escape() { printf '%s' "$1" | sed -e 's/[\/&|]/\\&/g'; }
sed -e "s|\${PAGERDUTY_ROUTING_KEY}|$(escape "$PAGERDUTY_ROUTING_KEY")|g" \
    -e "s|\${SLACK_WEBHOOK_URL}|$(escape "$SLACK_WEBHOOK_URL")|g" \
    -e "s|\${ONCALL_WEBHOOK_URL}|$(escape "$ONCALL_WEBHOOK_URL")|g" \
    "$(dirname "$0")/alertmanager.yml.tmpl" > "$out"
if [ "$#" -gt 0 ]; then
    exec "$@" --config.file="$out"
fi
