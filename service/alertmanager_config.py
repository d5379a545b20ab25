"""Write the Alertmanager config from its template and whichever receiver secrets exist.

The template (dashboards/alertmanager/alertmanager.yml.tmpl) is the whole config. Each integration names
its secret by file name only, in Alertmanager's own ``*_file`` fields (``routing_key_file``,
``api_url_file``, ``url_file``, ``credentials_file``); this module resolves those names against the secrets
directory and leaves out every integration whose secret file is missing or empty. A receiver left with no
integration stays, as a black hole, so the routes stay valid: Alertmanager starts with any subset of
PagerDuty, Slack and the on-call webhook configured, none included (alerts are then only in its UI and API).

Secrets never enter the written config: Alertmanager reads the files itself when it sends. This module reads
a URL secret only to check that it is one, so a typo fails here, at start, instead of at the first page.

    python -m service.alertmanager_config --template T --secrets-dir D --out O
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The `*_file` fields whose file holds a URL (checked to be http(s)); the others hold keys or tokens.
URL_SECRET_FIELDS = frozenset({"api_url_file", "url_file"})


class ConfigError(Exception):
    """The template or a secret cannot make a valid config; the message says which and why."""


@dataclass
class Rendered:
    config: dict[str, Any]
    kept: list[str] = field(default_factory=list)
    """`receiver/integration` entries written, e.g. `page/pagerduty`."""
    left_out: list[str] = field(default_factory=list)
    """`receiver/integration (why)` entries dropped for a missing or empty secret."""


def _secret_fields(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """(key path, value) of every `*_file` field in an integration, nested ones (http_config) included."""
    found: list[tuple[tuple[str, ...], str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                found.append(((*path, key), value))
            else:
                found.extend(_secret_fields(value, (*path, str(key))))
    return found


def _set(node: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _why_missing(secret: Path, field_name: str) -> str | None:
    """Why the secret cannot be used (None: it can); raises ConfigError for a malformed URL."""
    if not secret.is_file():
        return f"no {secret.name}"
    try:
        value = secret.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret {secret}: {exc.strerror}") from exc
    if not value:
        return f"{secret.name} is empty"
    if field_name in URL_SECRET_FIELDS and not value.startswith(("https://", "http://")):
        raise ConfigError(f"{secret} must hold an http(s) URL")
    return None


def render(template: dict[str, Any], secrets_dir: Path) -> Rendered:
    """The config to write: the template with each integration's secret names resolved against
    ``secrets_dir`` and the integrations whose secrets are not there left out."""
    receivers = template.get("receivers")
    if not isinstance(receivers, list) or not receivers:
        raise ConfigError("the template has no receivers")
    secrets_dir = secrets_dir.resolve()
    rendered = Rendered(config=template)
    for receiver in receivers:
        name = receiver.get("name")
        for key in [k for k in receiver if k.endswith("_configs")]:
            integration = key.removesuffix("_configs")
            kept = []
            for entry in receiver[key] or []:
                problems = []
                for path, secret_name in _secret_fields(entry):
                    if "/" in secret_name or secret_name in ("", ".", ".."):
                        raise ConfigError(
                            f"{name}/{integration}: {'.'.join(path)} must name a file in the secrets "
                            f"directory, not {secret_name!r}"
                        )
                    secret = secrets_dir / secret_name
                    why = _why_missing(secret, path[-1])
                    if why is not None:
                        problems.append(why)
                    _set(entry, path, str(secret))
                if problems:
                    rendered.left_out.append(f"{name}/{integration} ({', '.join(problems)})")
                else:
                    kept.append(entry)
                    rendered.kept.append(f"{name}/{integration}")
            if kept:
                receiver[key] = kept
            else:
                del receiver[key]
    return rendered


def write_config(template_path: Path, secrets_dir: Path, out: Path) -> Rendered:
    """Render the template and write it to ``out`` (mode 0644: Alertmanager runs as another user)."""
    try:
        template = yaml.safe_load(template_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the template {template_path}: {exc}") from exc
    if not isinstance(template, dict):
        raise ConfigError(f"the template {template_path} is not a YAML mapping")
    rendered = render(template, secrets_dir)
    header = (
        f"# Written by `python -m service.alertmanager_config` from {template_path.name}; do not edit.\n"
        f"# Secrets: {secrets_dir.resolve()}. Integrations: {', '.join(rendered.kept) or 'none'}.\n"
        f"# Left out: {', '.join(rendered.left_out) or 'none'}.\n"
    )
    text = header + yaml.safe_dump(rendered.config, sort_keys=False, width=120)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(out)
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.alertmanager_config", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--template", type=Path, required=True, help="alertmanager.yml.tmpl")
    parser.add_argument(
        "--secrets-dir", type=Path, required=True, help="where the secret files named by the template are"
    )
    parser.add_argument("--out", type=Path, required=True, help="the config file to write")
    args = parser.parse_args(argv)
    try:
        rendered = write_config(args.template, args.secrets_dir, args.out)
    except ConfigError as exc:
        print(f"alertmanager config: {exc}", file=sys.stderr)
        return 2
    print(f"alertmanager config: wrote {args.out}; integrations: {', '.join(rendered.kept) or 'none'}")
    for dropped in rendered.left_out:
        print(f"alertmanager config: left out {dropped}", file=sys.stderr)
    if not rendered.kept:
        print(
            "alertmanager config: no receiver is configured, so no alert is sent anywhere "
            "(they show in Alertmanager's UI and API only)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
