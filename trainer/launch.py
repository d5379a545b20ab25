"""`torchrun` with the trainer's exit codes preserved.

    python -m trainer.launch --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29500 -- --preset tiny --max-steps 40 --run-dir runs/demo

Everything before `--` goes to torchrun, everything after to `trainer.train`. Plain torchrun reports any
worker failure as exit code 1, which would hide the contract's codes; this wrapper maps them back:
42 if any rank diverged, else 43 if any stopped at the fp16 loss-scale floor, 2 if every failed rank
rejected the configuration, else the code of the first failure
(128 + N for death by signal N, as a shell reports it). The flags are validated before any process starts, and
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` is set (restarts fail intermittently without it).
"""

from __future__ import annotations

import os
import sys

from trainer.config import ConfigError, parse_args
from trainer.contract import EXIT_CONFIG, root_cause_exit_code


def exit_code_of(failures: dict[int, object]) -> int:
    """Contract exit code from torchrun's per-rank failures (objects with .exitcode and .timestamp)."""
    ordered = sorted(failures.values(), key=lambda f: getattr(f, "timestamp", 0))
    codes = [int(getattr(f, "exitcode", 1)) for f in ordered]
    return root_cause_exit_code([128 - code if code < 0 else code or 1 for code in codes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    launcher_args, trainer_args = argv[:split], argv[split + 1 :]
    try:
        parse_args(trainer_args)
    except ConfigError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*launcher_args, "-m", "trainer.train", *trainer_args])
    try:
        run(args)
    except ChildFailedError as e:
        return exit_code_of(e.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
