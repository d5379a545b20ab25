"""Terminal output shared by the CLI (service/cli.py) and the demo (service/demo.py): the consoles and the
printers of API payloads (goodput, restart preview, logbook). Both import it; it imports neither."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def esc(value: Any) -> str:
    """`value` as literal text inside a Rich markup string: data (a run's name, an owner, a note, a server's
    error message) may contain `[` and `]`, which Rich would otherwise read as markup, and crash on `[/]`."""
    return escape(str(value))


def iso_time(value: str | dt.datetime) -> str:
    """A time as ISO 8601 in UTC with its date and zone, ``2026-12-01T10:09:31Z`` (a time without a zone, as
    SQLite hands them back, is UTC: the control plane stores UTC)."""
    when = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


ISO_TIME_WIDTH = len("2026-12-01T10:09:31Z")


class DataTable(Table):
    """A table whose string cells are literal text, never markup (cells hold data written by users)."""

    def keep_whole(self, *headers: str) -> DataTable:
        """Never wrap or cut the cells of these columns (times: a date split over two lines cannot be read
        or searched for); the other columns give way on a narrow terminal."""
        for column in self.columns:
            if column.header in headers:
                column.no_wrap = True
                column.min_width = ISO_TIME_WIDTH
        return self

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kwargs)


def print_goodput(g: dict[str, Any]) -> None:
    ratio = f"{g['goodput']:.1%}" if g["goodput"] is not None else "n/a"
    console.print(
        f"goodput [bold]{ratio}[/]: {g['productive_s']:.1f} s productive of {g['wall_s']:.1f} s wall, "
        f"{g['attempts']} attempt(s), {g['steps_surviving']} steps kept, {g['steps_recomputed']} "
        "recomputed"
    )
    console.print(
        "  lost: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in g["lost"].items())
    )
    if g["failures"]:
        table = DataTable("failure", "count", "mean time to detect", "mean time to recover")
        for name, f in g["failures"].items():
            table.add_row(
                name,
                str(f["count"]),
                f"{f['mean_time_to_detect_s']:.1f} s" if f["mean_time_to_detect_s"] is not None else "-",
                f"{f['mean_time_to_recover_s']:.1f} s" if f["mean_time_to_recover_s"] is not None else "-",
            )
        console.print(table)


def print_restart_preview(p: dict[str, Any]) -> None:
    ckpt = p["checkpoint"]
    head = f"after a {p['failure']} failure"
    if p["divergence_onset"] is not None:
        head += f" (divergence onset: step {p['divergence_onset']}, {p['onset_source']})"
    if ckpt is not None:
        console.print(f"{head} it would restore [bold]step {ckpt['step']}[/] ({esc(ckpt['path'])})")
        pin = f", pinned by {ckpt['pinned_by']}" if ckpt["pinned"] else ""
        console.print(f"  stored verdict: {esc(ckpt['verdict'])}{pin}")
    elif p["needs_attention"]:
        console.print(f"{head} [bold red]nothing qualifies[/]: the run would need attention")
    else:
        console.print(f"{head} it would start from scratch")
    console.print(f"  why: {esc(p['reason'])}")
    if p["rejected"]:
        table = DataTable("rejected step", "why")
        for r in p["rejected"]:
            table.add_row(str(r["step"]), r["reason"])
        console.print(table)


def print_logbook(entries: list[dict[str, Any]]) -> None:
    table = DataTable("time", "kind", "sev", "author", "message", show_lines=False).keep_whole("time")
    colours = {"critical": "bold red", "error": "red", "warning": "yellow"}
    for e in entries:
        style = colours.get(e["severity"], "")
        table.add_row(iso_time(e["time"]), e["kind"], e["severity"], e["author"], e["message"], style=style)
    console.print(table)
