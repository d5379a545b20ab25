"""Charts as inline SVG, drawn on the server from stored metric rows (no chart library, no script).

The rows come from `crud.telemetry.metric_curves`: per attempt, every stored step for a short run, equal
step buckets computed in the database past `max_points` (never 15 s Prometheus samples). Each attempt is its
own line, so after a rollback the diverged branch and its recomputation never alternate in one zig-zag nor
average into each other; the steps a later attempt rolled back past are drawn faded and dashed. A
downsampled bucket keeps its minimum and maximum: the band around the line, so a one-step spike stays
visible in a long run. A series with a wide range (loss scale: 4 to 65,536) is drawn on a log axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 560, 150, 34


@dataclass(frozen=True)
class Line:
    attempt: int
    abandoned: bool  # steps a later attempt rolled back past (recomputed, not part of the run's history)
    points: tuple[tuple[int, float], ...]  # (step, mean over the bucket), finite values only
    band: tuple[tuple[int, float, float], ...] = ()  # (step, min, max) where a bucket spans values


@dataclass(frozen=True)
class Series:
    name: str
    lines: tuple[Line, ...]
    log: bool = False
    missing: int = 0  # buckets without a finite value (NaN loss, not reported)

    @property
    def points(self) -> int:
        return sum(len(line.points) for line in self.lines)


def _finite(value: object, log: bool) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and (not log or value > 0)


def series(name: str, rows: Sequence[Mapping[str, Any]], field: str, *, log: bool | None = None) -> Series:
    """One line per (attempt, abandoned) from `metric_curves` rows, which come ordered by attempt, step."""
    if log is None:  # a range over three decades reads better on a log axis
        values = [
            float(v)
            for r in rows
            for k in (field, f"{field}_min", f"{field}_max")
            if _finite(v := r.get(k), False)
        ]
        positive = [v for v in values if v > 0]
        log = bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 1000
    grouped: dict[tuple[int, bool], tuple[list[tuple[int, float]], list[tuple[int, float, float]]]] = {}
    missing = 0
    for row in rows:
        value = row.get(field)
        if not _finite(value, log):
            missing += 1
            continue
        step = int(row["step"])
        points, band = grouped.setdefault((int(row["attempt"]), bool(row["abandoned"])), ([], []))
        points.append((step, float(value)))
        lo, hi = row.get(f"{field}_min"), row.get(f"{field}_max")
        if _finite(lo, log) and _finite(hi, log) and lo != hi:
            band.append((step, float(lo), float(hi)))
    lines = tuple(
        Line(attempt, abandoned, tuple(points), tuple(band))
        for (attempt, abandoned), (points, band) in sorted(grouped.items())
    )
    return Series(name, lines, log=bool(log), missing=missing)


def svg(chart: Series) -> Markup:
    """The series as an SVG line chart, one line per attempt, with its range and step span labelled."""
    title = escape(chart.name)
    if not chart.points:
        return Markup(
            f'<svg class="chart" role="img" aria-label="{title}: no data" viewBox="0 0 {WIDTH} {HEIGHT}">'
            f'<text x="{PAD}" y="{HEIGHT / 2}">{title}: no data yet</text></svg>'
        )

    def scale(value: float) -> float:
        return math.log10(value) if chart.log else value

    steps = [s for line in chart.lines for s, _ in line.points]
    values = [scale(v) for line in chart.lines for _, v in line.points]
    values += [scale(v) for line in chart.lines for _, lo, hi in line.band for v in (lo, hi)]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    if v1 == v0:
        v0, v1 = v0 - 1, v1 + 1
    span_s = max(s1 - s0, 1)

    def x(step: int) -> float:
        return PAD + (step - s0) / span_s * (WIDTH - 2 * PAD)

    def y(value: float) -> float:
        return HEIGHT - PAD + (scale(value) - v0) / (v1 - v0) * -(HEIGHT - 2 * PAD)

    drawn = []
    for line in chart.lines:
        kind = "abandoned" if line.abandoned else "kept"
        label = f"attempt {line.attempt}" + (" (rolled back past)" if line.abandoned else "")
        if line.band:
            edge = [f"{x(s):.1f},{y(hi):.1f}" for s, _, hi in line.band]
            edge += [f"{x(s):.1f},{y(lo):.1f}" for s, lo, _ in reversed(line.band)]
            corners = " ".join(edge)
            drawn.append(
                f'<polygon class="band {kind}" points="{corners}"><title>{label}: range</title></polygon>'
            )
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in line.points)
        drawn.append(
            f'<polyline class="line {kind} attempt-{line.attempt}" data-attempt="{line.attempt}" '
            f'points="{path}"><title>{label}</title></polyline>'
        )
    lo, hi = (10**v0, 10**v1) if chart.log else (v0, v1)
    axis = " (log)" if chart.log else ""
    gaps = f", {chart.missing} not finite" if chart.missing else ""
    attempts = sorted({line.attempt for line in chart.lines})
    branches = sum(line.abandoned for line in chart.lines)
    who = f", attempts {', '.join(map(str, attempts))}" if len(attempts) > 1 else ""
    who += f", {branches} rolled back" if branches else ""
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'aria-label="{title}{axis}: {len(steps)} points, steps {s0}-{s1}{who}{gaps}">'
        f'<text class="title" x="{PAD}" y="14">{title}{axis}</text>'
        f'<text x="2" y="{PAD + 4}">{hi:.4g}</text><text x="2" y="{HEIGHT - PAD}">{lo:.4g}</text>'
        f'<text x="{PAD}" y="{HEIGHT - 8}">step {s0}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">step {s1}</text>'
        + "".join(drawn)
        + "</svg>"
    )
