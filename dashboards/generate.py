"""Grafana dashboards as code: `python dashboards/generate.py` writes dashboards/grafana/*.json.

The JSON files are committed (Grafana provisions them as they are) and tests/test_observability_dashboards.py
fails when they differ from what this script generates, so edit here, then regenerate.

Live values come from Prometheus (datasource uid ``trainops-prometheus``). Per-step history of long runs
comes from the control plane's PostgreSQL database (datasource uid ``trainops-postgres``), grouped by
Grafana's ``$__interval`` so a months-long run is downsampled by the database, not shipped whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PROMETHEUS = {"type": "prometheus", "uid": "trainops-prometheus"}
POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "trainops-postgres"}
OUT_DIR = Path(__file__).resolve().parent / "grafana"
RUN = 'run="$run"'


class Board:
    """Collects panels in a 24-column grid, numbering them and placing them left to right."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_height = 0

    def _place(self, width: int, height: int) -> dict[str, int]:
        if self.x + width > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": self._place(24, 1),
                "panels": [],
            }
        )
        self.x, self.y, self.row_height = 0, self.y + 1, 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        unit: str = "short",
        width: int = 12,
        height: int = 8,
        description: str = "",
        defaults: dict[str, Any] | None = None,
        overrides: list[dict[str, Any]] | None = None,
        options: dict[str, Any] | None = None,
        sql: bool = False,
        sql_format: str = "time_series",
        instant: bool = False,
    ) -> None:
        datasource = POSTGRES if sql else PROMETHEUS
        panel_targets = []
        for ref, (query, legend) in zip("ABCDEFGH", targets, strict=False):
            if sql:
                panel_targets.append(
                    {
                        "refId": ref,
                        "datasource": datasource,
                        "format": sql_format,
                        "rawQuery": True,
                        "editorMode": "code",
                        "rawSql": query,
                    }
                )
            else:
                panel_targets.append(
                    {
                        "refId": ref,
                        "datasource": datasource,
                        "expr": query,
                        "legendFormat": legend,
                        "instant": instant,
                        "range": not instant,
                    }
                )
        field_defaults: dict[str, Any] = {"unit": unit, **(defaults or {})}
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": kind,
                "title": title,
                "description": description,
                "datasource": datasource,
                "gridPos": self._place(width, height),
                "targets": panel_targets,
                "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
                "options": options or {},
            }
        )


def right_axis(series: str, unit: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": series},
        "properties": [
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "unit", "value": unit},
        ],
    }


def dashboard(
    uid: str, title: str, board: Board, *, variables: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["trainops"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": annotations},
        "panels": board.panels,
    }


RUN_VARIABLE = {
    "name": "run",
    "label": "Run",
    "type": "query",
    "datasource": PROMETHEUS,
    "query": {"query": "label_values(trainops_run_phase, run)", "refId": "run"},
    "definition": "label_values(trainops_run_phase, run)",
    "refresh": 2,
    "sort": 1,
    "multi": False,
    "includeAll": False,
}


def p95(histogram: str, by: str) -> str:
    # Groups without observations in the window would give NaN; keep only those with traffic.
    groups = ", ".join(label.strip() for label in by.split(",") if label.strip() != "le")
    return (
        f"histogram_quantile(0.95, sum by ({by}) (rate({histogram}_bucket[5m]))"
        f" and on ({groups}) (sum by ({groups}) (rate({histogram}_count[5m])) > 0))"
    )


def mean_of(histogram: str, by: str) -> str:
    """The mean of every observation of a histogram the collector reads from the database (cumulative)."""
    return f"sum by ({by}) ({histogram}_sum) / sum by ({by}) ({histogram}_count)"


def history_sql(select: str, where: str = "") -> str:
    """One downsampled series from the metrics table: one row per Grafana interval, not per step."""
    return (
        f"SELECT $__timeGroupAlias(m.time, $__interval), {select}\n"
        "FROM metrics m JOIN runs r ON r.id = m.run_id\n"
        f"WHERE r.name = '$run' AND $__timeFilter(m.time){where}\n"
        "GROUP BY 1\nORDER BY 1"
    )


# The trainer's layer groups (trainer.contract.TRAINER_LAYER_GROUPS; a test keeps them equal) and the natural
# logarithm of 2: metaseq logs the loss in bits (loss / ln 2).
LAYER_GROUPS = ("embed", "lower", "upper", "head")
LN2 = "0.6931471805599453"


def value_sql(name: str, aggregate: str, label: str) -> str:
    """One downsampled series of a named value of the metric points (`values`, docs/reporting-contract.md)."""
    field = f"CAST(m.\"values\"->>'{name}' AS double precision)"
    return history_sql(f'{aggregate}({field}) AS "{label}"', f" AND m.\"values\"->>'{name}' IS NOT NULL")


def run_dashboard() -> dict[str, Any]:
    b = Board()
    b.row("Live (Prometheus)")
    b.panel(
        "Phase",
        [(f"trainops_run_phase{{{RUN}}} == 1", "{{phase}}")],
        kind="stat",
        width=6,
        height=4,
        instant=True,
        options={"textMode": "name", "reduceOptions": {"calcs": ["lastNotNull"]}},
    )
    b.panel("Step", [(f"trainops_run_step{{{RUN}}}", "step")], kind="stat", width=6, height=4)
    b.panel(
        "Last checkpoint step / age",
        [
            (f"trainops_run_last_checkpoint_step{{{RUN}}}", "step"),
            (f"time() - trainops_run_last_checkpoint_timestamp_seconds{{{RUN}}}", "age"),
        ],
        kind="stat",
        width=6,
        height=4,
        overrides=[
            {"matcher": {"id": "byName", "options": "age"}, "properties": [{"id": "unit", "value": "s"}]}
        ],
    )
    b.panel(
        "Goodput",
        [(f"trainops_run_goodput_ratio{{{RUN}}}", "goodput")],
        kind="gauge",
        unit="percentunit",
        width=6,
        height=4,
        description="Time in attempts whose steps were kept over wall-clock time since the first attempt.",
        defaults={"min": 0, "max": 1},
    )
    b.panel(
        "Loss and validation perplexity",
        [
            (f"trainops_run_loss{{{RUN}}}", "train loss (nats)"),
            (f"trainops_run_loss{{{RUN}}} / {LN2}", "train loss (bits, as OPT's logbook)"),
            (f"trainops_run_validation_loss{{{RUN}}}", "validation loss"),
            (f"exp(trainops_run_validation_loss{{{RUN}}})", "validation perplexity"),
        ],
        description="The trainer's loss is in nats; metaseq (OPT's logbook) logs it in bits: nats / ln 2.",
        overrides=[right_axis("validation perplexity", "short")],
    )
    b.panel(
        "Loss scale",
        [(f"trainops_run_loss_scale{{{RUN}}}", "loss scale")],
        description="fp16 dynamic loss scale, log axis. Below the 1.0 line the scale has collapsed "
        "(OPT's sign of coming divergence).",
        defaults={
            "custom": {
                "scaleDistribution": {"type": "log", "log": 2},
                "thresholdsStyle": {"mode": "line"},
            },
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1.0}],
            },
        },
    )
    b.panel(
        "Final-layer activation norm",
        [
            (f"trainops_run_final_layer_activation_mean_norm{{{RUN}}}", "mean (metaseq actv_norm)"),
            (f"trainops_run_final_layer_activation_norm{{{RUN}}}", "RMS (act_norm)"),
        ],
        description="The final block's output, per-token L2 norm averaged over the step's tokens: the mean "
        "is what OPT's logbook reports (metaseq's actv_norm) and what the divergence detector reads; the RMS "
        "is trainops' earlier definition. A steady rise precedes loss divergence (OPT logbook).",
    )
    b.panel(
        "Gradient norm and share of steps clipped",
        [
            (f"trainops_run_grad_norm{{{RUN}}}", "grad norm"),
            (f"trainops_run_grad_clip_fraction{{{RUN}}}", "clipped (last 100 steps)"),
        ],
        description="Share of the last 100 steps whose gradient norm exceeded the clip (metaseq's clip).",
        overrides=[right_axis("clipped (last 100 steps)", "percentunit")],
    )
    b.panel(
        "Embedding and parameter norms",
        [
            (f"trainops_run_token_embedding_norm{{{RUN}}}", "token embedding"),
            (f"trainops_run_position_embedding_norm{{{RUN}}}", "position embedding"),
            (f"trainops_run_embedding_norm{{{RUN}}}", "token + position"),
            (f"trainops_run_parameter_norm{{{RUN}}}", "parameters"),
        ],
        description="Mean per-token L2 norms of the embeddings (metaseq's tok_norm, pos_norm, emb_norm; "
        "metaseq's tok_norm already includes the positions: compare it with token + position) and the L2 "
        "norm of all parameters.",
        overrides=[right_axis("parameters", "short")],
    )
    b.panel(
        "GPU memory (busiest rank)",
        [
            (f"trainops_run_gpu_memory_allocated_bytes{{{RUN}}}", "allocated (step peak)"),
            (f"trainops_run_gpu_memory_reserved_bytes{{{RUN}}}", "reserved (step peak)"),
            (f"trainops_run_gpu_memory_free_bytes{{{RUN}}}", "free"),
        ],
        unit="bytes",
        description="CUDA only (metaseq's cuda_gb_allocated, cuda_gb_reserved, cuda_gb_free).",
    )
    b.panel(
        "Learning rate and clip",
        [
            (f"trainops_run_learning_rate{{{RUN}}}", "learning rate"),
            (f"trainops_run_grad_clip_threshold{{{RUN}}}", "clip"),
        ],
        overrides=[right_axis("clip", "short")],
    )
    b.panel(
        "Throughput and MFU",
        [
            (f"trainops_run_tokens_per_second{{{RUN}}}", "tokens/s"),
            (f"trainops_run_mfu_ratio{{{RUN}}}", "MFU"),
            (f"trainops_run_gpu_flops_per_second{{{RUN}}} / 1e12", "TFLOP/s per GPU"),
        ],
        overrides=[right_axis("MFU", "percentunit"), right_axis("TFLOP/s per GPU", "short")],
    )
    b.panel(
        "Restarts by reason",
        [(f"sum by (reason) (trainops_run_restarts_total{{{RUN}}})", "{{reason}}")],
        kind="bargauge",
        instant=True,
    )
    b.panel(
        "Heartbeat and progress age",
        [
            (f"time() - trainops_run_heartbeat_timestamp_seconds{{{RUN}}}", "since stalest rank heartbeat"),
            (f"time() - trainops_run_last_step_timestamp_seconds{{{RUN}}}", "since last step"),
        ],
        unit="s",
    )
    b.row("History (PostgreSQL, downsampled per interval)")
    b.panel(
        "Loss history",
        [
            (history_sql('avg(m.loss) AS "train loss (nats)"', " AND m.loss IS NOT NULL"), ""),
            (history_sql(f'avg(m.loss) / {LN2} AS "train loss (bits)"', " AND m.loss IS NOT NULL"), ""),
        ],
        sql=True,
        description="Whole-run history from the control plane's database, averaged per Grafana interval; "
        "in bits as OPT's logbook reports it.",
    )
    b.panel(
        "Validation perplexity history",
        [
            (
                history_sql(
                    "exp(avg(CAST(m.\"values\"->>'val_loss' AS double precision)))"
                    ' AS "validation perplexity"',
                    " AND m.\"values\"->>'val_loss' IS NOT NULL",
                ),
                "",
            )
        ],
        sql=True,
    )
    b.panel(
        "Loss scale history",
        [
            (
                history_sql(
                    'min(m.loss_scale) AS "loss scale (interval minimum)"', " AND m.loss_scale IS NOT NULL"
                ),
                "",
            )
        ],
        sql=True,
        defaults={
            "custom": {"scaleDistribution": {"type": "log", "log": 2}, "thresholdsStyle": {"mode": "line"}},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1.0}],
            },
        },
    )
    b.panel(
        "Activation norm history",
        [
            (
                history_sql(
                    'max(m.actv_norm) AS "mean, metaseq actv_norm (interval maximum)"',
                    " AND m.actv_norm IS NOT NULL",
                ),
                "",
            ),
            (
                history_sql(
                    'max(m.act_norm) AS "RMS, act_norm (interval maximum)"', " AND m.act_norm IS NOT NULL"
                ),
                "",
            ),
        ],
        sql=True,
        description="Rows stored before migration 0009 have the RMS only.",
    )
    b.panel(
        "Gradient norm by layer group history",
        [(value_sql(f"gnorm_{g}", "max", g), "") for g in LAYER_GROUPS],
        sql=True,
        description="L2 norm of each layer group's gradient before clipping (metaseq's gnorm_*; groups: "
        "embeddings, lower and upper half of the blocks, final layer norm), interval maximum.",
    )
    b.panel(
        "Largest gradient element by layer group history",
        [(value_sql(f"gmax_{g}", "max", g), "") for g in LAYER_GROUPS],
        sql=True,
        description="metaseq's gmax_*, interval maximum.",
    )
    b.panel(
        "Share of zero gradients by layer group history",
        [(value_sql(f"gzero_{g}", "max", g), "") for g in LAYER_GROUPS],
        sql=True,
        unit="percentunit",
        description="Share of each group's gradient elements within 2 x the smallest normal number of zero "
        "(metaseq's gzero_*), interval maximum: a rise means underflow or dead units.",
    )
    b.panel(
        "Share of steps clipped history",
        [(value_sql("clipped", "avg", "steps clipped"), "")],
        sql=True,
        unit="percentunit",
        description="Share of each interval's steps whose gradient norm exceeded the clip (metaseq's clip).",
    )
    b.panel(
        "Embedding and parameter norm history",
        [
            (value_sql("emb_norm", "avg", "token + position embedding"), ""),
            (value_sql("param_norm", "avg", "parameters"), ""),
        ],
        sql=True,
        overrides=[right_axis("parameters", "short")],
    )
    b.panel(
        "GPU memory history",
        [(value_sql("cuda_gb_allocated", "max", "allocated GiB (step peak, busiest rank)"), "")],
        sql=True,
        description="CUDA only.",
    )
    restarts = {
        "name": "Restarts",
        "datasource": PROMETHEUS,
        "enable": True,
        "iconColor": "red",
        "expr": f"changes(trainops_run_restarts_total{{{RUN}}}[1m]) > 0",
        "step": "30s",
        "titleFormat": "restart",
        "textFormat": "previous attempt ended: {{reason}}",
        "tagKeys": "reason",
    }
    return dashboard("trainops-run", "trainops / Run", b, variables=[RUN_VARIABLE], annotations=[restarts])


def fleet_dashboard() -> dict[str, Any]:
    b = Board()
    b.row("Nodes")
    b.panel(
        "Nodes by state",
        [("sum by (state) (trainops_node_state)", "{{state}}")],
        kind="bargauge",
        width=8,
        instant=True,
    )
    b.panel(
        "Cordoned nodes over time",
        [
            ('sum(trainops_node_state{state="cordoned"})', "cordoned"),
            (
                'sum(trainops_node_state{state=~"suspect|draining|probation"})',
                "suspect, draining or probation",
            ),
        ],
        width=16,
    )
    b.panel(
        "Lemon nodes (most failures)",
        [("topk(10, trainops_node_failures_total + trainops_node_blames_total) > 0", "{{node}}")],
        kind="bargauge",
        width=8,
        instant=True,
        description="Failures recorded against a node plus run failures blamed on it.",
    )
    b.panel(
        "Failing diagnostics (latest result per check)",
        [("trainops_node_diagnostic_passed == 0", "{{node}} {{check}}")],
        kind="table",
        width=8,
        instant=True,
    )
    b.panel(
        "Node report age",
        [("time() - trainops_node_last_heartbeat_timestamp_seconds", "{{node}}")],
        unit="s",
        width=8,
    )
    b.row("GPUs")
    b.panel(
        "GPU temperature",
        [("trainops_gpu_temperature_celsius", "{{node}} GPU {{gpu}}")],
        unit="celsius",
        width=8,
    )
    b.panel(
        "ECC errors since boot",
        [
            ("trainops_gpu_ecc_uncorrected_errors_total > 0", "{{node}} GPU {{gpu}} double-bit"),
            ("trainops_gpu_ecc_corrected_errors_total > 0", "{{node}} GPU {{gpu}} corrected"),
        ],
        width=8,
    )
    b.panel(
        "XID events",
        [("sum by (node, gpu, reason) (trainops_gpu_xid_errors_total)", "{{node}} GPU {{gpu}} {{reason}}")],
        width=8,
    )
    b.row("Diagnostics")
    b.panel(
        "Check results per second",
        [("sum by (check, status) (rate(trainops_health_checks_total[5m]))", "{{check}} {{status}}")],
        unit="ops",
    )
    b.panel(
        "Check duration p95",
        [
            (
                p95("trainops_health_check_duration_seconds", "check, le"),
                "{{check}}",
            ),
            ("max by (check) (trainops_node_diagnostic_duration_seconds)", "{{check}} slowest node, latest"),
        ],
        unit="s",
    )
    b.row("Failures and recovery")
    b.panel(
        "Fleet ETTR",
        [("trainops_fleet_effective_training_time_ratio", "ETTR")],
        kind="gauge",
        unit="percentunit",
        width=6,
        description="Effective training time ratio: productive step time over wall time, summed over every "
        "run running or finished within 24 h (docs/goodput.md, Fleet ETTR).",
        defaults={"min": 0, "max": 1},
    )
    b.panel(
        "Mean time to detect by failure class",
        [(mean_of("trainops_failure_detection_seconds", "failure_class"), "{{failure_class}}")],
        kind="bargauge",
        unit="s",
        width=9,
        instant=True,
        description="Last step progress -> failure noticed, averaged over every failure recorded.",
    )
    b.panel(
        "Mean time to recover by failure class",
        [(mean_of("trainops_failure_recovery_seconds", "failure_class"), "{{failure_class}}")],
        kind="bargauge",
        unit="s",
        width=9,
        instant=True,
        description="Failure noticed -> the next attempt's first step, averaged over every failure recorded.",
    )
    return dashboard("trainops-fleet", "trainops / Fleet", b, variables=[], annotations=[])


LOGBOOK_SQL = (
    'SELECT l.time AS "time", l.severity AS "severity", l.kind AS "kind", r.name AS "run",\n'
    '  n.hostname AS "node", l.author AS "author", l.message AS "message", l.evidence AS "evidence"\n'
    "FROM logbook l\n"
    "LEFT JOIN runs r ON r.id = l.run_id\n"
    "LEFT JOIN nodes n ON n.id = l.node_id\n"
    "WHERE $__timeFilter(l.time)\n"
    "ORDER BY l.time DESC, l.id DESC\n"
    "LIMIT 500"
)


def oncall_dashboard() -> dict[str, Any]:
    b = Board()
    b.row("Now")
    b.panel(
        "Alerts firing or pending",
        [("sum by (alertname, alertstate, severity) (ALERTS)", "{{alertname}}")],
        kind="table",
        instant=True,
        width=12,
    )
    b.panel(
        "Runs in needs_attention",
        [('trainops_run_phase{phase="needs_attention"} == 1', "{{run}}")],
        kind="table",
        instant=True,
        width=12,
    )
    b.panel(
        "Time since last progress per run",
        [
            (
                "time() - trainops_run_last_step_timestamp_seconds and on (run) "
                '(trainops_run_phase{phase=~"starting|running|restarting|needs_attention"} == 1)',
                "{{run}}",
            )
        ],
        unit="s",
        width=12,
    )
    b.panel(
        "Time since stalest heartbeat per run",
        [("time() - trainops_run_heartbeat_timestamp_seconds", "{{run}}")],
        unit="s",
        width=12,
    )
    b.row("Control plane")
    b.panel(
        "API latency p95 by route",
        [
            (
                p95("trainops_http_request_duration_seconds", "route, le"),
                "{{route}}",
            )
        ],
        unit="s",
        width=8,
    )
    b.panel(
        "Metric ingest rate",
        [
            ("sum(rate(trainops_metric_points_ingested_total[5m]))", "accepted"),
            ("sum(rate(trainops_metric_points_duplicate_total[5m]))", "duplicates"),
        ],
        unit="ops",
        width=8,
    )
    b.panel("Celery queue depth", [("sum by (queue) (trainops_celery_queue_length)", "{{queue}}")], width=8)
    b.panel(
        "Orchestrator loop duration p95",
        [
            (
                p95("trainops_orchestrator_loop_duration_seconds", "le"),
                "p95",
            )
        ],
        unit="s",
        width=8,
    )
    b.panel(
        "Scrape targets and database",
        [
            ('up{job=~"trainops-.*"}', "{{job}} {{instance}}"),
            ("trainops_control_plane_database_up", "database"),
        ],
        width=16,
    )
    b.row("Logbook (PostgreSQL)")
    b.panel(
        "Logbook",
        [(LOGBOOK_SQL, "")],
        kind="table",
        sql=True,
        sql_format="table",
        width=24,
        height=10,
        description="Every decision, action and failure the control plane recorded in the time range, newest "
        "first, with its evidence (trainops logbook on the command line). Read as trainops_reader.",
        options={"showHeader": True, "sortBy": [{"displayName": "time", "desc": True}]},
    )
    return dashboard("trainops-oncall", "trainops / On-call", b, variables=[], annotations=[])


DASHBOARDS = {"run.json": run_dashboard, "fleet.json": fleet_dashboard, "oncall.json": oncall_dashboard}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
