"""SlurmLauncher's pure parts: decoding Slurm's exit codes and records, mapping job states to outcomes,
and the sbatch command line (the cluster tests in test_slurm_orchestrator.py run it for real)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from service.fleet.slurm import SlurmDefaults, parse_scontrol_record
from service.orchestrator.launchers.base import LaunchSpec
from service.orchestrator.launchers.slurm import (
    JobView,
    SlurmLauncher,
    decode_exit_field,
    decode_wait_status,
    read_job_exit_status,
    root_cause_exit_code,
    status_of_job,
)
from service.recovery.detect import classify_exit


def launch_spec(run_dir: Path, **changes: object) -> LaunchSpec:
    """A two-node attempt of run 3; tests change what they look at."""
    fields: dict = {
        "run_id": 3,
        "run_name": "opt",
        "attempt": 1,
        "hosts": ("n1", "n3"),
        "procs_per_host": 1,
        "run_dir": run_dir,
        "trainer_args": ("--preset", "tiny"),
        **changes,
    }
    return LaunchSpec(**fields)


def test_raw_wait_status_and_exit_field_decode_as_a_shell_reports_them() -> None:
    assert decode_wait_status(42 << 8) == 42
    assert decode_wait_status(0) == 0
    assert decode_wait_status(9) == 137  # killed by SIGKILL
    assert decode_exit_field("2:0") == 2
    assert decode_exit_field("0:15") == 143


def test_scontrol_record_values_may_contain_spaces() -> None:
    line = (
        "JobId=7 JobName=trainops-r-a1 JobState=NODE_FAIL Reason=None Comment=trainops run=3 attempt=1 "
        "tag=ab ExitCode=0:9 WorkDir=/srv/my runs NodeList=n[1-2]"
    )
    record = parse_scontrol_record(line)
    assert record["JobState"] == "NODE_FAIL" and record["NodeList"] == "n[1-2]"
    assert record["WorkDir"] == "/srv/my runs"
    assert decode_exit_field(record["ExitCode"]) == 137


@pytest.mark.parametrize(
    ("state", "exit_code", "exit_file", "expected_state", "outcome"),
    [
        ("RUNNING", None, None, "running", None),
        ("PENDING", None, None, "running", None),
        ("COMPLETED", 0, 0, "exited", "completed"),
        ("FAILED", 42, None, "exited", "divergence"),
        ("FAILED", 1, 3, "exited", "crash"),  # the batch script's exit file is the trainer's own code
        ("FAILED", 2, None, "exited", "config"),
        ("PREEMPTED", 0, None, "exited", "signal"),
        ("TIMEOUT", 0, None, "exited", "signal"),
        ("OUT_OF_MEMORY", 0, None, "exited", "signal"),
    ],
)
def test_job_states_map_onto_attempt_outcomes(
    state: str, exit_code: int | None, exit_file: int | None, expected_state: str, outcome: str | None
) -> None:
    status = status_of_job(JobView(5, state, exit_code, "None", "n[1-2]"), exit_file)
    assert status.state == expected_state
    if outcome is not None:
        assert status.exit_code is not None and classify_exit(status.exit_code).outcome == outcome
    assert "Slurm job 5 on n[1-2]" in status.detail


@pytest.mark.parametrize("state", ["NODE_FAIL", "BOOT_FAIL"])
def test_a_node_failure_is_a_hardware_failure_naming_the_failed_nodes(state: str) -> None:
    status = status_of_job(JobView(5, state, 0, "None", "n[1-2]"), None, failed_hosts=("n2",))
    assert status.node_failure and status.failed_hosts == ("n2",)
    assert status.detail == f"Slurm job 5 on n[1-2]: node failure ({state}) of n2"
    unnamed = status_of_job(JobView(5, state, 0, "None", "n[1-2]"), None)
    assert unnamed.node_failure and unnamed.failed_hosts == ()
    assert not status_of_job(JobView(5, "FAILED", 1, "None", "n1"), None).node_failure


def test_exclude_placement_lets_slurm_place_off_the_unfit_hosts(tmp_path: Path) -> None:
    launcher = SlurmLauncher(workdir=tmp_path)
    spec = launch_spec(
        tmp_path,
        launcher_options={"placement": "exclude", "nodelist": ["n4", "n2"]},
        unfit_hosts=("n2", "n5"),
    )
    info = launcher.prepare(spec)
    argv = launcher.sbatch_argv(spec, info, tmp_path / "job.sh")
    assert info["placement"] == "exclude"
    # the spare n2 is out of service: excluded, and not required
    assert {"--nodes=2", "--exclude=n2,n5", "--nodelist=n4"} <= set(argv)
    assert not any(a.startswith("--nodelist=n1") for a in argv)


def test_sbatch_argv_carries_placement_ids_and_the_runs_slurm_options(tmp_path: Path) -> None:
    launcher = SlurmLauncher(defaults=SlurmDefaults(partition="batch", account="ops"), workdir=tmp_path)
    spec = launch_spec(
        tmp_path,
        attempt=2,
        procs_per_host=8,
        launcher_options={
            "partition": "gpu",
            "time_limit": "1:00:00",
            "gpus_per_node": 8,
            "extra_sbatch_flags": ["--exclusive"],
        },
    )
    info = launcher.prepare(spec)
    argv = launcher.sbatch_argv(spec, info, tmp_path / "job.sh")
    assert argv[:2] == ["sbatch", "--parsable"]
    assert {
        "--nodes=2",
        "--nodelist=n1,n3",
        "--no-requeue",
        "--partition=gpu",
        "--account=ops",
        "--time=1:00:00",
        "--gpus-per-node=8",
        "--exclusive",
    } <= set(argv)
    assert f"--comment=trainops run=3 attempt=2 tag={info['tag']}" in argv
    assert info["world_size"] == 16
    script = launcher.batch_script(spec, info)
    assert "--nproc-per-node 8" in script and '--node-rank "$SLURM_NODEID"' in script


@pytest.mark.parametrize(
    ("tasks", "job_code", "expected"),
    [
        # Rank 0's node exits 3; srun kills the other node's task (no record) and reports SIGKILL.
        ([(10.0, 3)], 137, 3),
        # The survivor failed on its own (a gloo error) after the root cause: the first failure wins.
        ([(10.5, 1), (10.0, 3)], 137, 3),
        ([(10.0, 1), (10.2, 42)], 1, 42),  # a divergence anywhere is the attempt's outcome
        ([(10.0, 1), (10.2, 43)], 1, 43),  # ... so is the fp16 loss scale's floor
        ([(10.0, 43), (10.2, 42)], 1, 42),
        ([(10.0, 2), (10.1, 2)], 2, 2),  # every task rejected the configuration
        ([(10.0, 0), (10.1, 0)], 0, 0),
        ([], 143, 143),  # every task killed (scancel): srun's status is all there is
        ([(10.0, 3)], None, None),  # the job has not ended yet
    ],
)
def test_a_multi_node_attempt_exits_with_its_root_cause(
    tasks: list[tuple[float, int]], job_code: int | None, expected: int | None
) -> None:
    assert root_cause_exit_code(tasks, job_code) == expected


def test_each_task_records_its_own_exit_status(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nexit "$FAKE_CODE"\n')
    fake_python.chmod(0o755)
    launcher = SlurmLauncher(python=str(fake_python), workdir=tmp_path)
    spec = launch_spec(tmp_path)
    info = launcher.prepare(spec)
    Path(info["attempt_dir"]).mkdir(parents=True)
    command = launcher.task_command(spec, info)
    for node_id, code in ((0, 3), (1, 0)):
        env = {**os.environ, "SLURM_NODEID": str(node_id), "FAKE_CODE": str(code)}
        assert subprocess.run(["bash", "-c", command], env=env).returncode == code
    records = sorted(Path(info["attempt_dir"]).glob("exit-node*.json"))
    assert [p.name for p in records] == ["exit-node0.json", "exit-node1.json"]
    assert '"exit_code": 3' in records[0].read_text()
    (Path(info["attempt_dir"]) / "exit.json").write_text('{"exit_code": 137, "ended": 0}')
    # srun reported the survivor killed by SIGKILL; the attempt's outcome is node 0's own code.
    assert read_job_exit_status(Path(info["attempt_dir"])) == 3
