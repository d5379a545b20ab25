"""The supervisor process of one local attempt: runs the command, records its exit status in a file.

The orchestrator starts it in a new session so that the attempt outlives an orchestrator restart; the exit
file lets a restarted orchestrator learn how an attempt it did not start ended.

    python -m service.orchestrator.runner ATTEMPT_DIR -- COMMAND...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit.json"
RUNNER_FILE = "runner.json"


def _write_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: python -m service.orchestrator.runner ATTEMPT_DIR -- COMMAND...", file=sys.stderr)
        return 2
    attempt_dir = Path(argv[0])
    command = argv[2:]
    attempt_dir.mkdir(parents=True, exist_ok=True)
    with open(attempt_dir / "output.log", "ab") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _write_atomic(
            attempt_dir / RUNNER_FILE,
            {"runner_pid": os.getpid(), "child_pid": child.pid, "started": time.time()},
        )

        def forward(signum: int, _frame: object) -> None:
            # torchrun turns SIGTERM into an orderly shutdown of its workers
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        code = child.wait()
    # Popen reports death by signal N as -N; report it as a shell does (128 + N)
    exit_code = 128 - code if code < 0 else code
    _write_atomic(attempt_dir / EXIT_FILE, {"exit_code": exit_code, "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
