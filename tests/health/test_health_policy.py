"""The cordon policy as a table: node state + history + new results + rules -> decision."""

from __future__ import annotations

import pytest

from health.config import HealthConfig
from health.results import CheckResult, CheckStatus, Fault, Level
from service.fleet.policy import CordonRules, Offence, Verdict, classify, decide, decide_offence, lemon_score
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
    ("quick sweeps never graduate probation: a deep check must pass", P, clean, [clean] * 5, None),
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


# (story, state, this deep sweep's verdict, expected target)
DEEP_TABLE = [
    ("a clean deep sweep ends probation", P, clean, H),
    ("a soft finding in the deep checks sends it back to cordon", P, soft, C),
    ("a hard one too", P, hard, C),
    ("a clean deep sweep does not return a cordoned node by itself", C, clean, None),
    ("nor a retired one", R, clean, None),
]


@pytest.mark.parametrize(
    ("story", "state", "verdict", "expected"), DEEP_TABLE, ids=[t[0] for t in DEEP_TABLE]
)
def test_probation_ends_on_a_deep_check(
    story: str, state: NodeState, verdict: Verdict, expected: NodeState | None
) -> None:
    decision = decide(state=state, verdict=verdict, findings=[], history=[], rules=RULES, level=Level.deep)
    assert decision.target == expected, decision.reason
    assert decision.evidence["level"] == "deep"
    quick = decide(state=P, verdict=clean, findings=[], history=[clean] * 3, rules=RULES, level=Level.quick)
    assert quick.target is None and "until a deep check passes" in quick.reason


def test_rules_are_data_a_stricter_fleet_cordons_on_the_first_soft_finding() -> None:
    strict = CordonRules(strikes_to_cordon=1)
    assert decide(state=H, verdict=soft, findings=[], history=[], rules=strict).target is C
    assert decide(state=H, verdict=soft, findings=[], history=[], rules=RULES).target is S


def _result(check: str, status: CheckStatus, *faults: str) -> CheckResult:
    reason = None if status is CheckStatus.passed else f"{check} {status.value}"
    return CheckResult(check=check, status=status, reason=reason, faults=list(faults))


CLASSIFY_TABLE = [
    ("all passed", Level.quick, [_result("nvml.ecc", CheckStatus.passed)], clean),
    (
        "no NVML on a host without GPUs is no evidence",
        Level.quick,
        [_result("nvml.ecc", CheckStatus.skipped)],
        clean,
    ),
    (
        "no NVML on a host that declares GPUs is a finding",
        Level.quick,
        [
            _result("nvml.gpu_count", CheckStatus.skipped, Fault.nvml_missing),
            _result("nvml.ecc", CheckStatus.skipped, Fault.nvml_missing),
            _result("host.clock", CheckStatus.passed),
        ],
        soft,
    ),
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
    skipped_with_faults = any(r.status is CheckStatus.skipped and r.faults for r in results)
    assert len(findings) == skipped_with_faults + sum(
        r.status not in (CheckStatus.passed, CheckStatus.skipped) for r in results
    )


def test_skipped_nvml_checks_on_a_gpu_host_make_it_suspect_with_the_reason() -> None:
    why = "no NVML on this host (NVMLError_LibraryNotFound), on a host that declares 8 GPU(s)"
    results = [
        CheckResult(check=name, status=CheckStatus.skipped, reason=why, faults=[Fault.nvml_missing])
        for name in ("nvml.gpu_count", "nvml.ecc", "nvml.thermal")
    ]
    verdict, [finding] = classify(results, Level.quick, RULES)
    assert verdict is soft and finding.faults == (Fault.nvml_missing,) and not finding.hard
    assert "3 check(s) skipped (nvml.gpu_count, nvml.ecc, nvml.thermal)" in finding.reason
    decision = decide(state=H, verdict=verdict, findings=[finding], history=[], rules=RULES)
    assert decision.target is S and "declares 8 GPU(s)" in decision.reason
    assert decision.evidence["findings"][0]["faults"] == ["nvml_missing"]


DAY = 86400.0


def offences(*ages_days: float, kind: str = "hang") -> list[Offence]:
    return [Offence(kind=kind, reason=f"{kind} #{i}", age_s=a * DAY) for i, a in enumerate(ages_days)]


# (story, state, offences' ages in days (this one first), what it is charged with -> expected target)
LEMON_TABLE = [
    ("a first blamed hang makes a healthy node suspect", H, [0], S, S),
    ("a second offence on a suspect keeps it suspect", S, [0, 0.1], S, None),
    ("three fresh offences retire the lemon", S, [0, 0.1, 0.2], S, R),
    ("any hardware failure counts: a straggler, then a hang, then a crash", P, [0, 0.5, 1], C, R),
    ("a lemon on probation that fails again is retired", P, [0, 1, 2], S, R),
    ("old offences decay: two from a month ago and a fresh one do not make a lemon", H, [0, 30, 31], S, S),
    ("two fresh offences and one from a month ago: not yet", S, [0, 0, 30], S, None),
    ("three within a week: a lemon", H, [0, 3.5, 7], S, R),
    ("three spread over ten days: not yet", H, [0, 5, 10], S, S),
    ("a confirmed fault cordons a healthy node", H, [0], C, C),
    ("a confirmed fault cordons a draining node", D, [0], C, C),
    ("a cordoned node charged again stays cordoned", C, [0], C, None),
    ("a retired node stays retired", R, [0, 0, 0, 0], S, None),
]


@pytest.mark.parametrize(
    ("story", "state", "ages", "consequence", "expected"), LEMON_TABLE, ids=[t[0] for t in LEMON_TABLE]
)
def test_lemon_score_counts_every_hardware_failure_and_decays(
    story: str, state: NodeState, ages: list[float], consequence: NodeState, expected: NodeState | None
) -> None:
    charged = offences(*ages)
    decision = decide_offence(state=state, offences=charged, consequence=consequence, rules=RULES)
    assert decision.target == expected, decision.reason
    if expected is not None:
        assert expected in NODE_TRANSITIONS[state]
    assert [o["age_s"] for o in decision.evidence["offences"]] == [a * DAY for a in ages]
    assert decision.evidence["lemon_score"] == round(
        lemon_score(charged, half_life_s=RULES.lemon_half_life_s), 3
    )


def test_the_half_life_halves_an_offence() -> None:
    assert lemon_score(offences(0, 7, 14), half_life_s=7 * DAY) == pytest.approx(1.75)
    short = CordonRules(lemon_half_life_s=DAY)
    assert decide_offence(state=S, offences=offences(0, 1, 2), consequence=S, rules=short).target is None
    assert decide_offence(state=S, offences=offences(0, 1, 2), consequence=S, rules=RULES).target is R


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


@pytest.mark.parametrize(
    "changes",
    [{"strikes_to_cordon": 0}, {"flap_window": 2}, {"lemon_score_limit": 0.5}, {"lemon_half_life_s": 0}],
)
def test_cordon_rules_refuse_inconsistent_thresholds(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CordonRules(**changes)  # type: ignore[arg-type]


def test_lemon_settings_come_from_the_health_config() -> None:
    config = HealthConfig.from_env(
        {"TRAINOPS_HEALTH_LEMON_HALF_LIFE_S": "86400", "TRAINOPS_HEALTH_LEMON_SCORE_LIMIT": "4"}
    )
    rules = CordonRules.from_config(config)
    assert (rules.lemon_half_life_s, rules.lemon_score_limit) == (86400.0, 4.0)
    with pytest.raises(ValueError):
        HealthConfig(lemon_score_limit=0.5)
