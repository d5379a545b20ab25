"""A run's extra sbatch flags refine the job; they never override what trainops sets (issue 12, defect 5)."""

from __future__ import annotations

import pytest

from service.sbatch_flags import check_sbatch_flags


@pytest.mark.parametrize(
    "flag",
    [
        "--export=ALL,LD_PRELOAD=/tmp/evil.so",  # code in every task
        "--output=/runs/other/trainer.log",  # trainops's own log file
        "--comment=trainops:run=7",  # the orchestrator finds its jobs by comment
        "--job-name=x",
        "--nodelist=gpu-1",
        "--exclude=gpu-2",
        "--nodes=1",
        "--chdir=/",
        "--partition=debug",
        "--account=other",
        "--time=1",
        "--requeue",
        "--wrap=id",
        "--dependency=afterok:1",
        "--uid=0",
    ],
)
def test_flags_that_override_trainops_are_refused_by_name(flag: str) -> None:
    name = flag.split("=", 1)[0]
    with pytest.raises(ValueError, match=f"extra_sbatch_flags: {name} is not allowed"):
        check_sbatch_flags([flag])


@pytest.mark.parametrize("flag", ["-o/tmp/x", "normal", "--qos normal", "--qos=a\n#SBATCH --export=ALL", ""])
def test_only_one_token_long_options(flag: str) -> None:
    # ["--qos", "normal"]: the second token could be read as anything (here, the batch script's name)
    with pytest.raises(ValueError, match="is not of the form --name or --name=value"):
        check_sbatch_flags([flag])


def test_refining_flags_pass() -> None:
    check_sbatch_flags(["--qos=high", "--constraint=h100&ib", "--exclusive", "--mem=0", "--reservation=opt"])
