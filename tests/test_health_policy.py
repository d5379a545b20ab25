"""The cordon policy as a table: node state + history + new results + rules -> decision."""

from __future__ import annotations

import pytest

from health.config import HealthConfig
from health.policy import CordonRules, Verdict, classify, decide, decide_blame
from health.results import CheckResult, CheckStatus, Fault, Level
from service.statemachine import NODE_TRANSITIONS, NodeState

RULES = CordonRules()
H, S, C, D, P, R = (
    NodeState.healthy,
    NodeState.suspect,
    NodeState.cordoned,
    NodeState.draining,
    NodeState.probation,
    NodeState.retired,
)
clean, soft, hard, missed = Verdict.clean, Verdict.soft, Verdict.hard, Verdict.missed

# (story, state, this sweep's verdict, earlier verdicts newest first, expected target or None)
TABLE = [
    ("a healthy node with a clean sweep stays", H, clean, [], None),
    ("a DBE ECC / XID 79 / missing GPU cordons a healthy node at once", H, hard, [], C),
    ("a hard fault cordons a suspect node", S, hard, [soft], C),
    ("a hard fault cordons a node on probation", P, hard, [clean], C),
    ("a hard fault cordons a draining node", D, hard, [], C),
    ("one thermal throttle makes a healthy node suspect", H, soft, [clean, clean], S),
    ("a missed deadline makes a healthy node suspect", H, missed, [], S),
    ("a second soft finding keeps it suspect", S, soft, [soft], None),
    ("the third soft finding in a row cordons", S, soft, [soft, soft], C),
    ("missed deadlines count as strikes too", S, missed, [missed, soft], C),
    ("one clean sweep is not enough to clear a suspect", S, clean, [soft], None),
    ("two clean sweeps in a row clear a suspect", S, clean, [clean, soft], H),
    (
        "flap damping: a node that keeps recovering is cordoned",
        H,
        soft,
        [clean, soft, clean, soft, clean, soft],
        C,
    ),
    (
        "flap damping: a flapping suspect does not return to healthy",
        S,
        clean,
        [clean, soft, clean, soft, clean, soft],
        None,
    ),
    ("a soft finding on probation sends the node back to cordon", P, soft, [clean], C),
    ("a missed deadline on probation makes it suspect", P, missed, [clean], S),
    ("probation needs three clean sweeps to graduate", P, clean, [clean], None),
    ("three clean sweeps graduate probation to healthy", P, clean, [clean, clean], H),
    ("a cordoned node waits for repair whatever the sweep says", C, clean, [clean, clean, clean], None),
    ("a cordoned node is not moved by new faults either", C, hard, [], None),
    ("a retired lemon is never returned automatically", R, clean, [clean] * 10, None),
    ("a retired lemon is not re-cordoned", R, hard, [], None),
    ("a draining node is the operator's unless a hard fault shows", D, soft, [soft, soft], None),
]


@pytest.mark.parametrize(
    ("story", "state", "verdict", "history", "expected"), TABLE, ids=[t[0] for t in TABLE]
)
def test_cordon_policy_table(
    story: str, state: NodeState, verdict: Verdict, history: list[Verdict], expected: NodeState | None
) -> None:
    decision = decide(state=state, verdict=verdict, findings=[], history=history, rules=RULES)
    assert decision.target == expected, decision.reason
    if decision.target is not None:
        # Every automatic move is one the node state machine allows, with a reason and evidence.
        assert decision.target in NODE_TRANSITIONS[state]
        assert decision.reason
        assert decision.evidence["verdict"] == verdict.value


def test_rules_are_data_a_stricter_fleet_cordons_on_the_first_soft_finding() -> None:
    strict = CordonRules(strikes_to_cordon=1)
    assert decide(state=H, verdict=soft, findings=[], history=[], rules=strict).target is C
    assert decide(state=H, verdict=soft, findings=[], history=[], rules=RULES).target is S


def _result(check: str, status: CheckStatus, *faults: str) -> CheckResult:
    reason = None if status is CheckStatus.passed else f"{check} {status.value}"
    return CheckResult(check=check, status=status, reason=reason, faults=list(faults))


CLASSIFY_TABLE = [
    ("all passed", Level.quick, [_result("nvml.ecc", CheckStatus.passed)], clean),
    ("no NVML is no evidence", Level.quick, [_result("nvml.ecc", CheckStatus.skipped)], clean),
    ("double-bit ECC", Level.quick, [_result("nvml.ecc", CheckStatus.failed, Fault.ecc_dbe)], hard),
    ("XID 79", Level.quick, [_result("nvml.xid", CheckStatus.failed, Fault.xid_79)], hard),
    ("missing GPU", Level.quick, [_result("nvml.gpu_count", CheckStatus.failed, Fault.gpu_missing)], hard),
    (
        "thermal throttling",
        Level.quick,
        [_result("nvml.thermal", CheckStatus.failed, Fault.thermal_throttle)],
        soft,
    ),
    ("PCIe downgrade", Level.quick, [_result("nvml.pcie", CheckStatus.failed, Fault.pcie_downgrade)], soft),
    ("slow GEMM", Level.deep, [_result("torch.gemm", CheckStatus.degraded, Fault.gemm_slow)], soft),
    (
        "low busbw",
        Level.deep,
        [_result("torch.allreduce_local", CheckStatus.degraded, Fault.busbw_low)],
        soft,
    ),
    (
        "failed deep check",
        Level.deep,
        [_result("torch.memory_pattern", CheckStatus.failed, Fault.memory_pattern)],
        hard,
    ),
    ("hung check", Level.quick, [_result("nvml.thermal", CheckStatus.timeout, Fault.check_timeout)], soft),
    (
        "host did not answer",
        Level.quick,
        [_result("health.worker", CheckStatus.timeout, Fault.missed_deadline)],
        missed,
    ),
]


@pytest.mark.parametrize(
    ("story", "level", "results", "expected"), CLASSIFY_TABLE, ids=[t[0] for t in CLASSIFY_TABLE]
)
def test_classify_results_into_a_verdict(
    story: str, level: Level, results: list[CheckResult], expected: Verdict
) -> None:
    verdict, findings = classify(results, level, RULES)
    assert verdict is expected
    assert len(findings) == sum(r.status not in (CheckStatus.passed, CheckStatus.skipped) for r in results)


BLAME_TABLE = [
    ("a first blame makes a healthy node suspect", H, 1, S),
    ("a second blame on a suspect keeps it suspect", S, 2, None),
    ("the third blame retires the lemon", S, 3, R),
    ("a lemon on probation that fails again is retired", P, 3, R),
    ("a cordoned lemon is retired", C, 4, R),
    ("a retired node stays retired", R, 5, None),
]


@pytest.mark.parametrize(
    ("story", "state", "count", "expected"), BLAME_TABLE, ids=[t[0] for t in BLAME_TABLE]
)
def test_blame_and_lemons(story: str, state: NodeState, count: int, expected: NodeState | None) -> None:
    decision = decide_blame(state=state, blame_count=count, reason="NCCL timeout at step 1200", rules=RULES)
    assert decision.target == expected
    if expected is not None:
        assert expected in NODE_TRANSITIONS[state]


@pytest.mark.parametrize(
    "changes",
    [
        {"quick_interval_s": 0},
        {"quick_check_timeout_s": 30.0, "quick_deadline_s": 25.0},
        {"deep_check_timeout_s": 900.0},
        {"min_gemm_ratio": 1.5},
        {"quick_interval_s": 5.0},
    ],
)
def test_health_config_refuses_inconsistent_settings(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**changes)  # type: ignore[arg-type]


def test_health_config_reads_the_environment() -> None:
    config = HealthConfig.from_env(
        {
            "TRAINOPS_HEALTH_HOST": "h7",
            "TRAINOPS_FAKE_NVML": "/tmp/f.json",
            "TRAINOPS_HEALTH_EXPECTED_GPUS": "4",
        }
    )
    assert (config.host, str(config.fake_nvml_path), config.expected_gpus) == ("h7", "/tmp/f.json", 4)


@pytest.mark.parametrize("changes", [{"strikes_to_cordon": 0}, {"flap_window": 2}, {"lemon_blame_count": 0}])
def test_cordon_rules_refuse_inconsistent_thresholds(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CordonRules(**changes)  # type: ignore[arg-type]
