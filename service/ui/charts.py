"""Charts as inline SVG, drawn on the server from stored metric rows (no chart library, no script).

The rows come from `crud.telemetry.query_metrics`, which averages equal step buckets past `max_points`: a
long run's curve is downsampled in the database, at full resolution for short ones, never from 15 s
Prometheus samples. A series with a wide range (loss scale: 4 to 65,536) is drawn on a log axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 560, 150, 34


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[tuple[int, float], ...]  # (step, value), finite values only
    log: bool = False
    missing: int = 0  # points without a finite value (NaN loss, not reported)


def series(name: str, rows: Sequence[dict[str, object]], field: str, *, log: bool | None = None) -> Series:
    points: list[tuple[int, float]] = []
    missing = 0
    for row in rows:
        value = row.get(field)
        if isinstance(value, int | float) and math.isfinite(value) and (not log or value > 0):
            points.append((int(row["step"]), float(value)))  # type: ignore[call-overload]
        else:
            missing += 1
    positive = [v for _, v in points if v > 0]
    if log is None:  # a range over three decades reads better on a log axis
        log = bool(positive) and len(positive) == len(points) and max(positive) / min(positive) > 1000
    return Series(name, tuple(points), log=bool(log), missing=missing)


def svg(chart: Series) -> Markup:
    """The series as an SVG line chart with its range and step span labelled."""
    title = escape(chart.name)
    if not chart.points:
        return Markup(
            f'<svg class="chart" role="img" aria-label="{title}: no data" viewBox="0 0 {WIDTH} {HEIGHT}">'
            f'<text x="{PAD}" y="{HEIGHT / 2}">{title}: no data yet</text></svg>'
        )
    steps = [s for s, _ in chart.points]
    values = [math.log10(v) if chart.log else v for _, v in chart.points]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    if v1 == v0:
        v0, v1 = v0 - 1, v1 + 1
    span_s = max(s1 - s0, 1)

    def x(step: int) -> float:
        return PAD + (step - s0) / span_s * (WIDTH - 2 * PAD)

    def y(value: float) -> float:
        return HEIGHT - PAD + (value - v0) / (v1 - v0) * -(HEIGHT - 2 * PAD)

    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values, strict=True))
    lo, hi = (10**v0, 10**v1) if chart.log else (v0, v1)
    axis = " (log)" if chart.log else ""
    gaps = f", {chart.missing} not finite" if chart.missing else ""
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'aria-label="{title}{axis}: {len(steps)} points, steps {s0}-{s1}{gaps}">'
        f'<text class="title" x="{PAD}" y="14">{title}{axis}</text>'
        f'<text x="2" y="{PAD + 4}">{hi:.4g}</text><text x="2" y="{HEIGHT - PAD}">{lo:.4g}</text>'
        f'<text x="{PAD}" y="{HEIGHT - 8}">step {s0}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">step {s1}</text>'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{path}"/></svg>'
    )
