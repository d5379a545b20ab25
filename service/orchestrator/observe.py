"""Observe: one run's desired and observed state as `decide()` reads it (`ObservedRun`), built from crud and
recovery reads, the attempt's processes (its launcher) and the ranks' newest heartbeats (the control plane's
`heartbeats` table, one query per run: docs/reporting-contract.md, "Heartbeats").

Two steps come before it on every pass and keep what it reads current: the checkpoints committed on disk
are catalogued (`sync_checkpoints`) and their verdicts refreshed (`refresh_verdicts`). Observing changes
nothing else, with one exception: a scheduler that placed an attempt itself has its allocation recorded as
the attempt's hosts (`record_attempt_allocation`), since everything decided afterwards depends on it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.crud.checkpoints import CatalogSource, checkpoint_checksums, upsert_checkpoint
from service.crud.decisions import RETIRE_HOSTS, decision_action, open_decision, open_decisions
from service.crud.nodes import node_states
from service.crud.runs import busy_hosts_by_run, get_run, list_attempts, record_attempt_allocation
from service.crud.telemetry import StoredBeat, attempt_heartbeats
from service.models import Attempt, Decision, Run
from service.orchestrator.decide import (
    ApprovalGates,
    EndedAttempt,
    ObservedAttempt,
    ObservedDecision,
    ObservedRun,
)
from service.orchestrator.launchers.base import HEARTBEAT_INTERVAL_KEY, Launcher, ProcessStatus, launcher_for
from service.recovery.config import OrchestratorConfig, divergence_for_run
from service.recovery.detect import RankBeat, Section
from service.recovery.samples import (
    act_norm_lineage,
    attempt_samples,
    attempt_saved_step,
    checkpoint_candidates,
    lineage_samples,
    recent_step_times,
)
from service.recovery.verdicts import refresh_checkpoint_verdicts
from service.statemachine import NodeState
from trainer import contract
from trainer.checkpoint import (
    MANIFEST,
    catalog_record,
    checkpoint_dirs,
    read_checksum,
    read_meta,
    verify_checkpoint,
)

AUTHOR = "system:orchestrator"


def timestamp(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def run_dir_of(runs_dir: Path, run: Run) -> Path:
    """Where the run's files live: checkpoints, heartbeats, the spool, each attempt's directory."""
    return runs_dir / run.name


@dataclass(frozen=True)
class FleetView:
    """The pool as one reconcile pass sees it: every node's state and when it last changed, and the hosts
    of each run's attempt in progress."""

    node_states: Mapping[str, NodeState]
    node_changed_at: Mapping[str, float]
    busy_by_run: Mapping[int, frozenset[str]]

    def busy_except(self, run_id: int) -> frozenset[str]:
        """The hosts of every other run's attempt in progress."""
        return frozenset(h for other, hosts in self.busy_by_run.items() if other != run_id for h in hosts)


def read_fleet(session: Session) -> FleetView:
    """Two queries, whatever the number of runs: the nodes as plain rows, and the attempts in progress."""
    rows = node_states(session)
    return FleetView(
        node_states={hostname: state for hostname, state, _ in rows},
        node_changed_at={hostname: changed.timestamp() for hostname, _, changed in rows},
        busy_by_run=busy_hosts_by_run(session),
    )


def observe_run(
    session: Session,
    *,
    run_id: int,
    runs_dir: Path,
    cfg: OrchestratorConfig,
    launchers: Mapping[str, Launcher],
    waiting_for_hosts_since: float | None,
    now: float,
    fleet: FleetView | None = None,
) -> ObservedRun:
    """The run as decide() sees it. `fleet` is the pool as read earlier in this pass (`read_fleet`); None
    reads it now."""
    fleet = fleet if fleet is not None else read_fleet(session)
    run = get_run(session, run_id=run_id)
    attempts = list_attempts(session, run_id=run_id)
    current = next((a for a in attempts if a.ended_at is None), None)
    history = tuple(
        EndedAttempt(
            number=a.number,
            hosts=tuple(a.hosts),
            ended_at=timestamp(a.ended_at) or now,
            outcome=a.exit_reason or "lost",
            findings=a.findings or {},
            newest_checkpoint_step=(a.findings or {}).get("newest_checkpoint_step"),
            last_step=a.last_step,
        )
        for a in attempts
        if a.ended_at is not None
    )
    checkpoints = checkpoint_candidates(session, run_id=run_id)
    observed_attempt = (
        observe_attempt(
            session,
            run=run,
            attempt=current,
            cfg=cfg,
            launchers=launchers,
            now=now,
        )
        if current is not None
        else None
    )
    config = run.config or {}
    return ObservedRun(
        run_id=run.id,
        name=run.name,
        desired=run.desired_state,
        phase=run.phase,
        target_steps=int(config.get("target_steps", 1)),
        checkpoint_interval=int(config.get("checkpoint_interval") or 0),
        divergence=divergence_for_run(cfg.divergence, run_config=config),
        host_count=int(config.get("host_count", 1)),
        max_restarts=int(config.get("max_restarts", cfg.remediation.max_restarts)),
        lr_scale=run.lr_scale,
        lr_override=run.lr_override,
        clip_override=run.clip_override,
        pending_restart=run.pending_restart,
        now=now,
        attempt=observed_attempt,
        history=history,
        node_states=fleet.node_states,
        busy_hosts=fleet.busy_except(run_id),
        checkpoints=tuple(checkpoints),
        act_norms=act_norm_lineage(
            session, run_id=run_id, from_step=min((c.step for c in checkpoints), default=0)
        ),
        node_changed_at=fleet.node_changed_at,
        waiting_for_hosts_since=waiting_for_hosts_since,
        step_times=recent_step_times(session, run_id=run_id, window=cfg.hang.step_time_window),
        hang_overrides={k: float(v) for k, v in (config.get("hang") or {}).items() if v is not None},
        approvals=approval_gates(config.get("approvals")),
        open_decision=observed_decision(open_decision(session, run_id=run_id)),
        open_retirements=tuple(
            d
            for d in map(observed_decision, open_decisions(session, run_id=run_id))
            if d is not None and d.action == RETIRE_HOSTS
        ),
    )


def observe_attempt(
    session: Session,
    *,
    run: Run,
    attempt: Attempt,
    cfg: OrchestratorConfig,
    launchers: Mapping[str, Launcher],
    now: float,
) -> ObservedAttempt:
    """The attempt in progress: its processes as its launcher sees them, its ranks' newest heartbeats, its
    newest metrics and the lineage it resumed from (decoded by crud)."""
    info = attempt.launcher or {}
    started = timestamp(attempt.started_at) or now
    if "tag" not in info:
        status = ProcessStatus("lost", detail="the launch was not recorded")
    else:
        status = launcher_for(launchers, info).status(info)
        if status.allocated_hosts and set(status.allocated_hosts) != set(attempt.hosts):
            record_attempt_allocation(
                session, attempt=attempt, allocated=status.allocated_hosts, author=AUTHOR
            )
    beats = tuple(rank_beat(b) for b in attempt_heartbeats(session, run_id=run.id, attempt=attempt.number))
    samples = attempt_samples(session, run_id=run.id, attempt=attempt.number)
    progress = [b.step for b in beats] + [s.step for s in samples]
    if status.state == "exited":
        # Beats and metrics stop arriving while the control plane is unreachable (the trainer spools its
        # metrics): the checkpoints the attempt committed, catalogued from disk, tell how far it got.
        saved = attempt_saved_step(session, run_id=run.id, attempt=attempt.number)
        progress += [saved] if saved is not None else []
    last_step = max(progress, default=None)
    lineage = lineage_samples(
        session,
        run_id=run.id,
        attempt=attempt.number,
        upto=attempt.start_step or 0,
        divergence=cfg.divergence,
    )
    return ObservedAttempt(
        number=attempt.number,
        hosts=tuple(attempt.hosts),
        started_at=started,
        world_size=int(info.get("world_size", len(attempt.hosts))),
        process=status,
        beats=beats,
        samples=samples,
        lineage=lineage,
        last_step=last_step,
        first_step_seen=attempt.first_step_at is not None,
        heartbeat_interval_s=recorded_heartbeat_interval(info),
    )


def approval_gates(policy: Mapping[str, Any] | None) -> ApprovalGates:
    """The run's approval policy as stored (validated by `schemas.ApprovalPolicy` when the run was made)."""
    if not policy:
        return ApprovalGates()
    return ApprovalGates(
        require=frozenset(policy.get("require") or ()),
        rollback_steps=int(policy.get("rollback_steps", 1000)),
        timeout_s=float(policy.get("timeout_s", 1800.0)),
        on_timeout=str(policy.get("on_timeout", "hold")),
    )


def observed_decision(decision: Decision | None) -> ObservedDecision | None:
    if decision is None:
        return None
    return ObservedDecision(
        id=decision.id,
        status=decision.status.value,
        gates=tuple(decision.gates),
        proposal=dict(decision.proposal or {}),
        expires_at=decision.expires_at.timestamp(),
        on_timeout=decision.on_timeout,
        decided_by=decision.decided_by,
        decision_reason=decision.decision_reason,
        operator_overrides=dict(decision.operator_overrides) if decision.operator_overrides else None,
        action=decision_action(decision),
    )


def recorded_heartbeat_interval(info: Mapping[str, Any]) -> float | None:
    """The beat interval recorded with the attempt's launch (None: launched before intervals scaled)."""
    value = info.get(HEARTBEAT_INTERVAL_KEY)
    return float(value) if isinstance(value, int | float) and value > 0 else None


def rank_beat(beat: StoredBeat) -> RankBeat:
    """A rank's stored heartbeat as decide() sees it. Its age is the orchestrator's clock minus the beat's
    `time` (the rank's clock): the contract assumes the two agree to well within the smallest hang limit."""
    return RankBeat(
        rank=beat.rank,
        host=beat.host or "?",
        step=beat.step,
        time=beat.time,
        step_time_s=beat.step_time_s,
        section=Section(beat.section),
        last_step_s=beat.last_step_s,
        busy=beat.busy_s,
        received_at=beat.received_at,
    )


def sync_checkpoints(session: Session, *, run_id: int, runs_dir: Path) -> None:
    """Catalogue the committed checkpoints found on disk: those the trainer could not report (control
    plane down while it saved), and re-saves the catalog has not heard of yet. The same idempotent upsert
    as the trainer's registration, with the record read from the checkpoint itself (meta.json,
    manifest), so the two converge in either order.

    Every pass looks at every retained checkpoint, so a path the catalog already holds with its manifest's
    checksum costs one stat: the checksum is read again only when the manifest file changed (a re-save
    writes a new one). At a thousand hosts a manifest lists ~16,000 files, and checking each retained
    checkpoint's files every pass kept a transaction open for seconds (the fleet simulator)."""
    run = get_run(session, run_id=run_id)
    known = checkpoint_checksums(session, run_id=run_id)
    for step, path in checkpoint_dirs(contract.checkpoints_dir(run_dir_of(runs_dir, run))):
        checksum = MANIFEST_CHECKSUMS.read(path)
        if checksum is None or known.get(str(path)) == checksum:
            continue  # not committed yet (or unreadable), or catalogued as it is
        ok, _reason = verify_checkpoint(path, deep=False)
        if not ok:
            continue
        try:
            record = catalog_record(path, step, read_meta(path), checksum)
        except (OSError, ValueError):  # deleted by retention while we looked, or torn
            continue
        upsert_checkpoint(session, run_id=run_id, data=record, source=CatalogSource.disk, author=AUTHOR)


class ManifestChecksums:
    """The checksum each checkpoint's manifest records, read again only when the manifest file changed
    (its inode, size or modification time): a manifest is written once, atomically, by rank 0 at commit."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int], str | None]] = {}
        self._max_entries = max_entries

    def read(self, path: Path) -> str | None:
        try:
            st = (path / MANIFEST).stat()
        except OSError:
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(str(path))
        if seen is not None and seen[0] == signature:
            return seen[1]
        if len(self._seen) >= self._max_entries:  # deleted checkpoints' entries; start over
            self._seen.clear()
        checksum = read_checksum(path)
        self._seen[str(path)] = (signature, checksum)
        return checksum


MANIFEST_CHECKSUMS = ManifestChecksums()


def refresh_verdicts(session: Session, *, run_id: int, runs_dir: Path, cfg: OrchestratorConfig) -> None:
    """Judge the run's undecided checkpoints and move the automatic pin (`recovery/verdicts.py`)."""
    run = get_run(session, run_id=run_id)
    refresh_checkpoint_verdicts(
        session, run_id=run_id, checkpoint_dir=contract.checkpoints_dir(run_dir_of(runs_dir, run)), cfg=cfg
    )
