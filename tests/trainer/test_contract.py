"""trainer/contract.py, the code twin of docs/reporting-contract.md: records round-trip, malformed stored
encodings are harmless, and both sides agree on exit codes, sections and flags."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import service.recovery.detect as detect
import trainer.launch as launch
import trainer.train as train
from service.crud.telemetry import decode_stored_field, decode_stored_values
from service.orchestrator.launchers.base import build_trainer_args
from service.recovery.samples import stored_metric_sample
from service.schemas import HeartbeatBatch
from trainer import contract
from trainer.config import TrainConfig


def test_exit_codes_are_one_definition_on_both_sides() -> None:
    assert (contract.EXIT_OK, contract.EXIT_CONFIG, contract.EXIT_DIVERGED) == (0, 2, 42)
    for module in (launch, train, detect):
        assert module.EXIT_CONFIG is contract.EXIT_CONFIG
    for module in (train, detect):
        assert module.EXIT_DIVERGED is contract.EXIT_DIVERGED
    assert (
        launch.root_cause_exit_code is contract.root_cause_exit_code
    )  # one precedence, as the Slurm launcher
    assert train.EXIT_OK is detect.EXIT_OK is contract.EXIT_OK
    assert train.EXIT_CHECKPOINT_CORRUPT is detect.EXIT_CHECKPOINT_CORRUPT is contract.EXIT_CHECKPOINT_CORRUPT
    assert contract.EXIT_CHECKPOINT_CORRUPT == 3
    assert train.EXIT_LOSS_SCALE_FLOOR is detect.EXIT_LOSS_SCALE_FLOOR is contract.EXIT_LOSS_SCALE_FLOOR == 43


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([43, 43], 43),  # every rank sees the same floor verdict
        ([1, 43], 43),  # a rank that failed on its way out does not hide it
        ([43, 42], 42),
        ([2, 2], 2),
        ([13, 1], 13),
    ],
)
def test_launch_keeps_the_divergence_codes_of_any_rank(codes: list[int], expected: int) -> None:
    failures = {rank: SimpleNamespace(exitcode=code, timestamp=rank) for rank, code in enumerate(codes)}
    assert launch.exit_code_of(failures) == expected


def test_run_directory_layout(tmp_path: Path) -> None:
    assert contract.checkpoints_dir(tmp_path) == tmp_path / "checkpoints"
    assert contract.spool_dir(tmp_path) == tmp_path / "spool"
    assert contract.metrics_path(tmp_path, 1) == tmp_path / "metrics" / "rank1.jsonl"
    assert contract.attempt_dir(tmp_path, 7) == tmp_path / "attempts" / "0007"


def test_the_beat_the_trainer_sends_is_the_beat_the_api_admits() -> None:
    record = contract.heartbeat_record(
        step=41,
        time=time.time(),
        section=contract.Section.CHECKPOINT_SAVE,
        step_time_s=0.31,
        last_step_s=0.34,
        busy=[(40, 0.3000001), (41, 0.33)],
        host="h1",
        pid=4242,
        rank=0,
    )
    body = json.loads(json.dumps(contract.heartbeat_batch(3, [record])))
    admitted = HeartbeatBatch.model_validate(body)
    assert admitted.attempt == 3
    [beat] = admitted.beats
    assert {**beat, "busy_s": [list(p) for p in beat["busy_s"]]} == record
    assert record["busy_s"] == [[40, 0.3], [41, 0.33]]


def test_odd_timings_become_what_the_api_admits() -> None:
    """Non-finite timings are null (the API refuses NaN), a long busy history keeps its newest pairs."""
    record = contract.heartbeat_record(
        step=30,
        time=time.time(),
        section=contract.Section.STEP,
        step_time_s=math.nan,
        last_step_s=math.inf,
        busy=[(s, math.inf if s == 29 else 0.5) for s in range(1, 31)],
        host="h1",
        pid=1,
        rank=2,
    )
    assert record["step_time_s"] is None and record["last_step_s"] is None
    assert [s for s, _ in record["busy_s"]] == [*range(15, 29), 30]  # the newest 16, the infinite one dropped
    HeartbeatBatch.model_validate(json.loads(json.dumps(contract.heartbeat_batch(1, [record]))))
    with pytest.raises(ValueError, match="at most 1024"):
        contract.heartbeat_batch(1, [record] * (contract.MAX_BEATS_PER_BATCH + 1))


def test_sections_agree_with_the_detector() -> None:
    assert {s.value for s in contract.Section} == {s.value for s in detect.Section}


def test_metric_point_wire_form_is_strict_json() -> None:
    point = {"step": 5, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "values": {"mfu": math.nan}}
    sent = contract.json_safe_point(point)
    assert sent == {
        "step": 5,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
        "values": {"mfu": None, contract.NONFINITE_LOSS_FLAG: 1.0},
    }
    json.dumps(sent, allow_nan=False)


def test_nonfinite_encoding_round_trip() -> None:
    point = {
        "step": 9,
        "loss": math.nan,
        "act_norm": math.nan,
        "lr": 0.1,
        "grad_norm": math.inf,
        "values": {},
    }
    stored, nan_names = contract.encode_nonfinite(point)
    assert nan_names == ["loss", "act_norm"]
    assert stored["loss"] is None and stored["act_norm"] is None and stored["grad_norm"] == math.inf
    assert stored["values"] == {"nan": ["loss", "act_norm"]}
    decoded = contract.decode_nonfinite(stored)
    assert math.isnan(decoded["loss"]) and math.isnan(decoded["act_norm"]) and decoded["lr"] == 0.1
    finite = {"step": 1, "loss": 2.0}
    assert contract.encode_nonfinite(finite) == (finite, [])


@pytest.mark.parametrize(
    "values",
    [
        None,
        [],
        "nan",
        {"nan": "loss"},
        {"nan": 1},
        {"nan": None},
        {"nan": {"loss": 1}},
        {"nan": [1, "loss"]},
        {"nan": [["loss"]]},
        {"nan": ["step", "values"]},
    ],
)
def test_malformed_nonfinite_encodings_neither_raise_nor_invent_a_nan(values: object) -> None:
    assert contract.decode_nan_names(values) == frozenset()
    row = SimpleNamespace(step=4, loss=None, loss_scale=1.0, act_norm=2.0, actv_norm=None, values=values)
    assert decode_stored_field(row, "loss") is None
    assert stored_metric_sample(row).loss is None
    decoded = decode_stored_values(
        SimpleNamespace(values=values, **dict.fromkeys(contract.METRIC_WIDE_FIELDS))
    )
    assert all(v is None for v in decoded.values())


def test_crud_decoder_restores_a_stored_nan() -> None:
    row = SimpleNamespace(
        step=4, loss=None, loss_scale=1.0, act_norm=None, actv_norm=None, values={"nan": ["loss", "act_norm"]}
    )
    assert math.isnan(decode_stored_field(row, "loss"))
    assert math.isnan(stored_metric_sample(row).loss)


def test_spool_records_round_trip(tmp_path: Path) -> None:
    spool = contract.Spool(contract.spool_dir(tmp_path))
    metrics = contract.metrics_spool_record(3, {"step": 10, "loss": 5.1})
    checkpoint = contract.checkpoint_spool_record(3, {"step": 10, "path": "/ckpt/step_00000010"})
    spool.append([metrics, checkpoint, {"kind": "future", "x": 1}])
    with spool.path.open("a") as f:
        f.write('{"kind": "metr')  # torn by a crash mid-append
    records = spool.read()
    assert len(records) == 3
    parsed = [contract.parse_spool_record(r) for r in records]
    assert parsed[0] == contract.SpooledMetricPoint(attempt=3, point={"step": 10, "loss": 5.1})
    assert parsed[1] == contract.SpooledCheckpoint(
        body={"attempt": 3, "step": 10, "path": "/ckpt/step_00000010"}
    )
    assert parsed[2] is None  # a kind this version does not know is skipped
    spool.drop_first(2)
    assert spool.read() == [{"kind": "future", "x": 1}]


@pytest.mark.parametrize(
    "record",
    [
        [],
        "metrics",
        {"attempt": 1},
        {"kind": "metrics", "attempt": 1},
        {"kind": "metrics", "attempt": "x", "point": {"step": 1}},
        {"kind": "metrics", "point": {"step": 1}},
        {"kind": "metrics", "attempt": 1, "point": [1]},
        {"kind": "checkpoint"},
        {"kind": "checkpoint", "body": "x"},
    ],
)
def test_malformed_spool_records_are_value_errors(record: object) -> None:
    with pytest.raises(ValueError):
        contract.parse_spool_record(record)


def test_orchestrator_trainer_flags_are_train_config_fields() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert contract.ORCHESTRATOR_TRAINER_FIELDS - fields == set()


def test_build_trainer_args_sets_only_contract_flags(tmp_path: Path) -> None:
    args = build_trainer_args(
        config={"target_steps": 50},
        run_dir=tmp_path,
        resume_from="/ckpt/step_00000010",
        overrides={"lr_scale": 0.5, "lr": 1e-4, "clip": 0.5, "reset_loss_scale": True, "skip_batches": 3},
        faults=["crash:step=5"],
    )
    flags = {a for a in args if a.startswith("--")}
    allowed = {contract.trainer_flag(f) for f in contract.ORCHESTRATOR_TRAINER_FIELDS}
    assert flags <= allowed
    assert flags == allowed  # every flag in the set is one the orchestrator sets somewhere


def test_run_hyperparameters_are_recipe_fields_of_the_right_kind() -> None:
    hints = typing.get_type_hints(TrainConfig)
    for name, kind in contract.RUN_HYPERPARAMETERS.items():
        assert name in hints, name
        # lr and clip are the run's base recipe; the operator's overrides come after them and win
        assert name not in contract.ORCHESTRATOR_TRAINER_FIELDS - {"lr", "clip"}, name
        if isinstance(kind, tuple):
            assert typing.get_origin(hints[name]) is typing.Literal, name
            assert set(typing.get_args(hints[name])) == set(kind), name
        else:
            allowed = set(typing.get_args(hints[name])) - {type(None)} or {hints[name]}
            assert allowed == {kind}, (name, allowed)
    for forbidden in ("run_dir", "resume_from", "corpus", "tokenizer_dir", "telemetry", "fault", "lr_scale"):
        assert forbidden not in contract.RUN_HYPERPARAMETERS


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"run_dir": "/runs/other-run"}, "hyperparameters.run_dir: not a hyperparameter"),
        ({"resume_from": "/runs/other-run/checkpoints/step_00000010"}, "hyperparameters.resume_from"),
        ({"corpus": "/etc"}, "hyperparameters.corpus"),
        ({"lr": "6e-4"}, "hyperparameters.lr: must be a finite number"),
        ({"lr": float("inf")}, "hyperparameters.lr: must be a finite number"),
        ({"seed": 1.5}, "hyperparameters.seed: must be an integer"),
        ({"seed": True}, "hyperparameters.seed: must be an integer"),
        ({"grad_predivide": 1}, "hyperparameters.grad_predivide: must be true or false"),
        ({"checkpoint_mode": "later"}, "hyperparameters.checkpoint_mode: must be 'async' or 'sync'"),
        ({"keep_checkpoints": 1}, "hyperparameters.keep_checkpoints: must be >= 2"),
    ],
)
def test_run_hyperparameters_refuse_what_a_run_may_not_set(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        contract.check_run_hyperparameters(values)


def test_run_hyperparameters_accept_the_recipe() -> None:
    contract.check_run_hyperparameters(
        {"lr": 6e-4, "weight_decay": 0, "seed": 7, "grad_predivide": False, "checkpoint_mode": "sync"}
    )
    contract.check_run_hyperparameters({"keep_checkpoints": 8, "threads": 1, "pg_timeout_s": 60})


def test_the_root_cause_of_a_failed_worker_group_is_the_trainers_verdict_before_the_first_death() -> None:
    from trainer.contract import root_cause_exit_code

    # a rank found its restore point corrupt and left; its peer, inside a collective, aborted (SIGABRT)
    # and was stamped first: the attempt is the corrupt checkpoint, not a signal
    assert root_cause_exit_code([134, 3]) == 3
    assert root_cause_exit_code([134, 13]) == 134  # no verdict: the first to fail, as torchrun says
    assert root_cause_exit_code([13, 43, 42]) == 42 and root_cause_exit_code([137, 43]) == 43
    assert root_cause_exit_code([2, 2]) == 2 and root_cause_exit_code([2, 13]) == 2
    assert root_cause_exit_code([]) == 1
