"""Control side of the cross-host fabric check: one all-reduce over all hosts, then a pairwise bisection.

:func:`run_fabric_check` is what a deep sweep of several hosts runs first (while the hosts are otherwise
idle). It sends every host its rank of one group all-reduce on the host's own queue
(``health.collective``), with a master address and port the control side picked and a join deadline.
When the group is slower than the expected bus bandwidth, or does not form at all, hosts are tested in
pairs, disjoint pairs per round so a round costs one pair test: a pair at full speed clears both ends,
and a bad pair with one end already cleared convicts the other end. With one bad host among n this takes
two rounds (three with an odd n). The result is per host: ``fabric.allreduce`` (the group figure) and,
when bisected, ``fabric.pairs`` naming the slow (soft, ``busbw_low``) or broken (hard, ``link_down``)
links of a culprit with their measurements.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from health.celery_app import HealthCelery
from health.checks.fabric import CollectiveOutcome, CollectiveSpec, master_port_for
from health.config import HealthConfig, host_queue
from health.results import CheckResult, CheckStatus, Fault

GROUP_CHECK = "fabric.allreduce"
PAIRS_CHECK = "fabric.pairs"
FABRIC_CHECKS = (GROUP_CHECK, PAIRS_CHECK)
MAX_PAIR_ROUNDS = 8
"""Bisection rounds at most; suspects still unresolved then are reported as such (soft)."""
_GATHER_SLACK_S = 10.0
"""Time beyond a rank's own limit for its answer to travel back through the result backend."""


@dataclass(frozen=True, kw_only=True)
class GroupMeasurement:
    """One all-reduce among ``hosts``: what every rank reported (None = its worker did not answer)."""

    hosts: tuple[str, ...]
    outcomes: dict[str, CollectiveOutcome | None]

    @property
    def formed(self) -> bool:
        """Every host answered, joined and finished the timed all-reduces."""
        return all(o is not None and o.joined and o.busbw_gbps is not None for o in self.outcomes.values())

    @property
    def busbw_gbps(self) -> float | None:
        """The slowest rank's view: a collective runs at the speed of its slowest link."""
        rates = [o.busbw_gbps for o in self.outcomes.values() if o is not None and o.busbw_gbps is not None]
        return min(rates) if self.formed and rates else None

    @property
    def expected_gbps(self) -> float | None:
        figures = [o.expected_gbps for o in self.outcomes.values() if o and o.expected_gbps is not None]
        return min(figures) if figures else None

    @property
    def silent(self) -> list[str]:
        return [h for h, o in self.outcomes.items() if o is None]

    def describe(self) -> str:
        label = "<->".join(self.hosts) if len(self.hosts) == 2 else f"{len(self.hosts)} hosts"
        if self.formed:
            return f"{label}: {self.busbw_gbps:.4g} GB/s"
        errors = sorted({o.error for o in self.outcomes.values() if o is not None and o.error})
        why = f"; {errors[0]}" if errors else ""
        silent = f" ({', '.join(self.silent)} did not answer)" if self.silent else ""
        return f"{label}: did not connect{silent}{why}"

    def to_json(self) -> dict[str, Any]:
        return {
            "hosts": list(self.hosts),
            "formed": self.formed,
            "busbw_gbps": self.busbw_gbps,
            "expected_gbps": self.expected_gbps,
            "ranks": {h: (o.to_json() if o else None) for h, o in self.outcomes.items()},
        }


def busbw_floor(expected_gbps: float | None, config: HealthConfig) -> float | None:
    return None if expected_gbps is None else expected_gbps * config.min_busbw_ratio


def link_ok(measurement: GroupMeasurement, floor_gbps: float | None) -> bool:
    """Formed, and at full speed where there is a figure to compare with (without one, only connectivity)."""
    rate = measurement.busbw_gbps
    return rate is not None and (floor_gbps is None or rate >= floor_gbps)


# --- the bisection, as pure functions over the pairs tested so far ------------------------------------
Pair = frozenset[str]


@dataclass(kw_only=True)
class Bisection:
    """Pairs tested so far and what they say; ``good``/``culprits`` are re-derived after each round."""

    hosts: list[str]
    floor_gbps: float | None
    tested: dict[Pair, GroupMeasurement] = field(default_factory=dict)
    rounds: int = 0

    def ok(self, pair: Pair) -> bool:
        return link_ok(self.tested[pair], self.floor_gbps)

    @property
    def good(self) -> set[str]:
        """Hosts with a pair at full speed: both ends of that path work."""
        return {h for pair in self.tested if self.ok(pair) for h in pair}

    @property
    def culprits(self) -> set[str]:
        """Hosts with a bad pair whose other end is known good (and that are not cleared themselves)."""
        good = self.good
        return {
            h
            for pair in self.tested
            if not self.ok(pair)
            for h in pair
            if h not in good and (pair - {h}) <= good
        }

    @property
    def unresolved(self) -> list[str]:
        """Hosts in a bad pair that are neither cleared nor convicted, plus hosts never tested."""
        decided = self.good | self.culprits
        return [h for h in self.hosts if h not in decided]

    def bad_links_of(self, host: str) -> list[GroupMeasurement]:
        return [m for pair, m in self.tested.items() if host in pair and not self.ok(pair)]

    def links_of(self, host: str) -> list[GroupMeasurement]:
        return [m for pair, m in self.tested.items() if host in pair]


def next_round(bisection: Bisection) -> list[tuple[str, str]]:
    """Disjoint pairs for the next round: each suspect against an unused known-good host, then the
    remaining suspects against each other (least-tested first), never repeating a tested pair."""
    good = bisection.good
    suspects = sorted(bisection.unresolved, key=lambda h: len(bisection.links_of(h)))
    references = [h for h in bisection.hosts if h in good]
    busy: set[str] = set()
    pairs: list[tuple[str, str]] = []

    def take(host: str, candidates: Iterable[str]) -> None:
        partner = next(
            (
                c
                for c in candidates
                if c not in busy and c != host and frozenset((host, c)) not in bisection.tested
            ),
            None,
        )
        if partner is not None:
            pairs.append((host, partner))
            busy.update((host, partner))

    for suspect in suspects:
        take(suspect, references)
    for suspect in suspects:
        if suspect not in busy:
            take(suspect, suspects)
    return pairs


# --- running collectives through the host queues ------------------------------------------------------
def run_groups(
    app: HealthCelery,
    groups: Sequence[Sequence[str]],
    *,
    config: HealthConfig,
    within_s: float | None = None,
) -> list[GroupMeasurement]:
    """Run one all-reduce per group, all groups at once (their hosts must be disjoint), and gather.

    ``within_s`` bounds the round: ranks get at most that long to join, and a rank that has not answered
    by then counts as silent (its worker is down or stuck).
    """
    size_bytes = int(config.allreduce_mb * 1024 * 1024)
    join_timeout_s = config.fabric_join_timeout_s
    # A rank may take its join deadline plus one check's limit before its worker kills it.
    limit_s = join_timeout_s + config.deep_check_timeout_s
    wait_s = limit_s + _GATHER_SLACK_S
    if within_s is not None:
        # Ranks that cannot join must say so while the round still waits for their answers.
        join_timeout_s = min(join_timeout_s, within_s / 2)
        limit_s = min(limit_s, within_s)
        wait_s = within_s
    # Embedded mode serves every host's queue from this process: all ranks run on this machine.
    default_addr = "127.0.0.1" if app.embedded_worker is not None else None
    pending: dict[str, tuple[int, str]] = {}
    for index, hosts in enumerate(groups):
        addr = config.fabric_master_addr or default_addr or hosts[0]
        port = master_port_for(addr)
        group_id = f"fabric-{uuid.uuid4().hex[:12]}"
        for rank, host in enumerate(hosts):
            spec = CollectiveSpec(
                group=group_id,
                master_addr=addr,
                master_port=port,
                rank=rank,
                world_size=len(hosts),
                size_bytes=size_bytes,
                join_timeout_s=join_timeout_s,
            )
            sent = app.send_task(
                "health.collective",
                kwargs={"host": host, "spec": spec.to_json()},
                queue=host_queue(host),
                expires=limit_s,
            )
            pending[sent.id] = (index, host)
    outcomes: list[dict[str, CollectiveOutcome | None]] = [dict.fromkeys(hosts) for hosts in groups]
    answered: set[str] = set()
    started = time.monotonic()
    # Once the join deadline has passed, a group none of whose answering ranks joined will not form:
    # its missing ranks are silent, and waiting out the check limit for them would only delay the sweep.
    settle_after_s = join_timeout_s + _GATHER_SLACK_S

    def settled(index: int) -> bool:
        ranks = [t for t, (i, _) in pending.items() if i == index]
        if all(t in answered for t in ranks):
            return True
        joined = any(o is not None and o.joined for o in outcomes[index].values())
        return not joined and time.monotonic() - started >= settle_after_s

    while not all(settled(i) for i in range(len(groups))):
        left = wait_s - (time.monotonic() - started)
        if left <= 0:
            break
        try:
            for task_id, meta in app.backend.get_many(
                set(pending) - answered, timeout=min(1.0, left), interval=0.02
            ):
                answered.add(task_id)
                index, host = pending[task_id]
                if meta.get("status") == "SUCCESS":
                    outcomes[index][host] = CollectiveOutcome.from_json(meta["result"])
        except CeleryTimeout:
            pass  # ranks still out; the loop decides whether to keep waiting
    return [GroupMeasurement(hosts=tuple(h), outcomes=o) for h, o in zip(groups, outcomes, strict=True)]


@dataclass(kw_only=True)
class FabricReport:
    """Per-host results of the cross-host check, and how it got them."""

    results: dict[str, list[CheckResult]]
    group: GroupMeasurement
    bisection: Bisection | None
    seconds: float


def run_fabric_check(
    app: HealthCelery, hosts: Sequence[str], *, deadline_s: float | None = None
) -> FabricReport:
    """All-reduce over ``hosts`` together; bisect pairwise when it is slow or does not form.

    With ``deadline_s`` the whole check (group round and bisection) ends within it: a host whose worker
    does not answer costs the rest of the budget, never the full join-plus-check limit of each round.
    """
    config = app.health_config
    start = time.perf_counter()
    hosts = list(hosts)
    if app.embedded_worker is not None:
        app.embedded_worker.ensure(hosts)

    def left_s() -> float | None:
        return None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - start))

    [group] = run_groups(app, [hosts], config=config, within_s=left_s())
    floor = busbw_floor(group.expected_gbps, config)
    bisection: Bisection | None = None
    if not link_ok(group, floor):
        answered = [h for h in hosts if h not in group.silent]
        bisection = bisect(
            answered,
            floor_gbps=floor,
            measure=lambda pairs: run_groups(app, pairs, config=config, within_s=left_s()),
            time_left_s=left_s,
        )
    results = judge(group, bisection, config=config)
    elapsed = time.perf_counter() - start
    for host_results in results.values():
        for result in host_results:
            result.duration_s = elapsed
    return FabricReport(results=results, group=group, bisection=bisection, seconds=elapsed)


Measure = Callable[[list[tuple[str, str]]], list[GroupMeasurement]]
"""Runs one round: an all-reduce per pair, all pairs at once."""


def bisect(
    hosts: list[str],
    *,
    floor_gbps: float | None,
    measure: Measure,
    time_left_s: Callable[[], float | None] = lambda: None,
) -> Bisection:
    """Test pairs round by round until every host is cleared or convicted, no new pair is left, or the
    time is up (``time_left_s`` returns 0; None means no limit); hosts left unresolved stay suspects."""
    bisection = Bisection(hosts=hosts, floor_gbps=floor_gbps)
    while bisection.rounds < MAX_PAIR_ROUNDS and time_left_s() != 0.0:
        pairs = next_round(bisection)
        if not pairs:
            break
        for measurement in measure(pairs):
            bisection.tested[frozenset(measurement.hosts)] = measurement
        bisection.rounds += 1
    return bisection


# --- judging: per-host results ------------------------------------------------------------------------
def _group_text(group: GroupMeasurement, floor: float | None) -> str:
    if not group.formed:
        return f"group all-reduce of {group.describe()}"
    expected = group.expected_gbps
    if floor is not None and expected is not None and not link_ok(group, floor):
        return (
            f"group all-reduce of {group.describe()} < {floor / expected:.0%} of {expected:.4g} GB/s expected"
        )
    return f"group all-reduce of {group.describe()}"


def judge(
    group: GroupMeasurement, bisection: Bisection | None, *, config: HealthConfig
) -> dict[str, list[CheckResult]]:
    """Turn the group measurement and the bisection into ``fabric.*`` results per host."""
    expected = group.expected_gbps
    floor = busbw_floor(expected, config)
    measured = {"group": group.to_json(), "min_busbw_ratio": config.min_busbw_ratio}
    text = _group_text(group, floor)
    results: dict[str, list[CheckResult]] = {}
    for host in group.hosts:
        if host in group.silent:
            results[host] = [
                CheckResult(
                    check=GROUP_CHECK,
                    status=CheckStatus.timeout,
                    reason=f"did not join the cross-host all-reduce: no answer on {host_queue(host)}",
                    faults=[Fault.missed_deadline],
                    measurements=measured,
                )
            ]
        elif bisection is None and expected is None:
            results[host] = [
                CheckResult(
                    check=GROUP_CHECK,
                    status=CheckStatus.skipped,
                    reason=f"{text}; no expected figure to judge it by (CPU hosts: set "
                    "TRAINOPS_HEALTH_CPU_BUSBW_BASELINE_GBPS, see python -m health.calibrate)",
                    measurements=measured,
                )
            ]
        elif bisection is None:
            results[host] = [CheckResult(check=GROUP_CHECK, status=CheckStatus.passed, measurements=measured)]
        else:
            results[host] = _bisected(host, text, measured, bisection)
    return results


def _bisected(
    host: str, group_text: str, measured: dict[str, Any], bisection: Bisection
) -> list[CheckResult]:
    links = bisection.links_of(host)
    pairs_measured = {"links": [m.to_json() for m in links], "rounds": bisection.rounds}
    if host in bisection.good:
        culprits = ", ".join(sorted(bisection.culprits)) or "none found"
        note = f"{group_text}; pairwise tests clear this host (culprits: {culprits})"
        return [
            CheckResult(check=GROUP_CHECK, status=CheckStatus.passed, reason=note, measurements=measured),
            CheckResult(check=PAIRS_CHECK, status=CheckStatus.passed, measurements=pairs_measured),
        ]
    floor = bisection.floor_gbps
    floor_text = f" (floor {floor:.4g} GB/s)" if floor is not None else ""
    good = bisection.good
    if host in bisection.culprits:
        # Only links to cleared hosts convict; a link between two culprits says nothing about either.
        bad = [m for m in bisection.bad_links_of(host) if set(m.hosts) - {host} <= good]
        broken = any(not m.formed for m in bad)
        status = CheckStatus.failed if broken else CheckStatus.degraded
        fault = Fault.link_down if broken else Fault.busbw_low
        named = "; ".join(m.describe() for m in bad)
        reason = f"{'broken' if broken else 'slow'} links to known-good hosts: {named}{floor_text}"
        group_reason = f"{group_text}; pairwise tests point at this host"
    else:
        status, fault = CheckStatus.degraded, Fault.busbw_low
        named = "; ".join(m.describe() for m in bisection.bad_links_of(host)) or "no partner left to test"
        reason = f"pairwise tests could not isolate the fault: {named}{floor_text}"
        group_reason = f"{group_text}; not isolated by the pairwise tests"
    return [
        CheckResult(
            check=GROUP_CHECK, status=status, reason=group_reason, faults=[fault], measurements=measured
        ),
        CheckResult(
            check=PAIRS_CHECK, status=status, reason=reason, faults=[fault], measurements=pairs_measured
        ),
    ]
