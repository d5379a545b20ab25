"""Packaging follows the package boundaries: the control plane installs and imports without the extras'
packages, each host's extra holds what its part imports, `make setup` installs the extras the suite
needs, and requirements.lock pins every requirement inside its range (`make lock-check` checks it is
exactly what pip-compile writes; that needs the package registry, so it runs in .ci/run, not here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]

# The import name of each extra's packages (torch, tokenizers and numpy from trainer, pynvml from health).
EXTRA_MODULES = ("torch", "tokenizers", "numpy", "pynvml", "kubernetes")
CONTROL_PLANE_ENTRY_MODULES = (
    "service.main",
    "service.cli",
    "service.orchestrator.runtime",
    "service.fleet.worker",
)
HOST_AGENT_MODULES = ("health.worker_main", "health.celery_app", "health.checks.registry")

BLOCKER = """
import sys


class _NotInstalled:
    # Imports of these top-level packages fail the way a missing package does.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            message = f"No module named {{name!r}} (blocked by tests/test_packaging.py)"
            raise ModuleNotFoundError(message, name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def run_without(
    blocked: tuple[str, ...], argv: list[str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a sitecustomize that makes the ``blocked`` packages look uninstalled: it applies
    to console scripts as well as to ``python -c``."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(blocked)))
    env = {**os.environ, "PYTHONPATH": str(site_dir)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def import_all(modules: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-c", f"import importlib\nfor m in {modules!r}: importlib.import_module(m)"]


def test_the_blocker_makes_a_package_look_uninstalled(tmp_path: Path) -> None:
    blocked = run_without(("pynvml",), [sys.executable, "-c", "import pynvml"], tmp_path)
    assert blocked.returncode != 0 and "blocked by tests/test_packaging.py" in blocked.stderr
    allowed = run_without(("pynvml",), [sys.executable, "-c", "import json"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_control_plane_imports_without_the_extras(tmp_path: Path) -> None:
    result = run_without(EXTRA_MODULES, import_all(CONTROL_PLANE_ENTRY_MODULES), tmp_path)
    assert result.returncode == 0, result.stderr


def test_cli_help_runs_without_the_extras(tmp_path: Path) -> None:
    trainops = Path(sys.executable).parent / "trainops"
    result = run_without(EXTRA_MODULES, [str(trainops), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "orchestrator" in result.stdout


def test_checkpoint_functions_the_control_plane_calls_need_no_torch(tmp_path: Path) -> None:
    # The orchestrator and the API verify, list and pin checkpoints (trainer.checkpoint) on the base install.
    script = (
        "import pathlib\n"
        "from trainer.checkpoint import is_pinned, list_checkpoints, pin_checkpoint, verify_checkpoint\n"
        "step = pathlib.Path('ckpt/step_00000010'); step.mkdir(parents=True)\n"
        "assert not verify_checkpoint(step)[0] and len(list_checkpoints('ckpt')) == 1\n"
        "pin_checkpoint(step); assert is_pinned(step)\n"
    )
    result = run_without(EXTRA_MODULES, [sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr


def test_cli_names_the_missing_extra_where_it_needs_nvml(tmp_path: Path) -> None:
    trainops = Path(sys.executable).parent / "trainops"
    argv = [str(trainops), "nodes", "register", "h1", "--gpus-from-nvml", "--url", "http://127.0.0.1:9"]
    result = run_without(EXTRA_MODULES, argv, tmp_path)
    assert result.returncode == 1
    assert "trainops[health]" in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_host_agent_imports_without_the_trainer_extra(tmp_path: Path) -> None:
    result = run_without(("torch", "tokenizers", "numpy"), import_all(HOST_AGENT_MODULES), tmp_path)
    assert result.returncode == 0, result.stderr


def test_torch_checks_are_skipped_with_a_reason_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from health.checks import DEEP_ONLY_CHECKS
    from health.checks.context import CheckContext
    from health.checks.registry import CHECK_FUNCTIONS
    from health.config import HealthConfig
    from health.results import CheckStatus

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    ctx = CheckContext(host="h1", config=HealthConfig(), expected_gpus=0)
    torch_checks = [name for name in DEEP_ONLY_CHECKS if name.startswith("torch.")]
    assert torch_checks
    for name in torch_checks:
        result = CHECK_FUNCTIONS[name](ctx)
        assert (result.check, result.status) == (name, CheckStatus.skipped)
        assert result.reason is not None and "trainops[trainer]" in result.reason


def test_check_registry_implements_exactly_the_catalogue() -> None:
    from health.checks import ALL_CHECKS
    from health.checks.registry import CHECK_FUNCTIONS

    assert tuple(CHECK_FUNCTIONS) == ALL_CHECKS


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def expand(extra: str) -> set[str]:
    """Distribution names an extra installs, following ``trainops[...]`` references to other extras."""
    found: set[str] = set()
    for text in EXTRAS[extra]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "trainops":
            for inner in requirement.extras:
                found |= expand(inner)
        else:
            found.add(canonicalize_name(requirement.name))
    return found


def test_base_dependencies_are_the_control_plane_only() -> None:
    base = names(PROJECT["dependencies"])
    assert not base & {"torch", "tokenizers", "numpy", "nvidia-ml-py", "kubernetes"}
    assert {"torch", "tokenizers", "numpy"} <= expand("trainer")
    assert expand("health") == {"nvidia-ml-py"}
    assert expand("kubernetes") == {"kubernetes"}
    assert expand("all") == expand("trainer") | expand("health") | expand("kubernetes")
    assert expand("all") | {"pytest", "pytest-timeout", "hypothesis", "ruff", "pip-tools"} <= expand("dev")


def test_nvml_lower_bound_release_has_what_health_reads() -> None:
    """Every NVML symbol health/ reads exists in the installed (locked) bindings, and the lock's release
    is within the health extra's range, whose lower bound pyproject.toml's comment gives evidence for."""
    import pynvml

    used = set()
    for source in (REPO / "health").rglob("*.py"):
        used |= set(re.findall(r"\b(?:pynvml|nvml|bindings)\.((?:NVML|nvml)\w+)", source.read_text()))
    assert "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION" in used
    assert sorted(s for s in used if not hasattr(pynvml, s)) == []
    (health_requirement,) = (Requirement(r) for r in EXTRAS["health"])
    assert lock_pins()["nvidia-ml-py"] in health_requirement.specifier


def makefile_setup_recipe() -> str:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M)
    assert match, "the Makefile's setup rule ($(STAMP)) was not found"
    return match.group(1)


def test_make_setup_installs_the_lock_and_the_extras_the_suite_needs() -> None:
    recipe = makefile_setup_recipe()
    assert (
        re.search(r"pip install -q -r \$\(LOCK\)", recipe)
        and "LOCK := requirements.lock" in (REPO / "Makefile").read_text()
    )
    (extras,) = re.findall(r"pip install -q --no-deps -e '\.\[([\w,]+)\]'", recipe)
    installed = set().union(*(expand(extra) for extra in extras.split(",")))
    # The suite imports every part: the trainer, the host agent, the Kubernetes adapter and the test tools.
    assert expand("all") | {"pytest", "pytest-timeout", "hypothesis", "ruff"} <= installed
    assert "--no-deps" in recipe, "the project itself must not re-resolve past the lock"


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert not line.startswith("-"), f"requirements.lock carries a pip option: {line}"
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_requirement_within_its_range() -> None:
    pins = lock_pins()
    assert "trainops" not in pins
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in EXTRAS.values() for r in extra]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "trainops":
            continue
        assert name in pins, f"{name} is not in requirements.lock: run make lock"
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} is outside {requirement}"
    # The local CPU wheel's release, without its build label (a GPU image installs the CUDA build of it).
    assert pins["torch"] == "2.13.0"


def test_control_plane_image_installs_no_gpu_extra() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S))
    installs = {
        stage: re.findall(r"pip install .*-c requirements\.lock '\.\[([\w,]*)\]'", body)
        for stage, body in stages.items()
    }
    (control_extras,) = installs["control"]
    assert not {"torch", "tokenizers", "nvidia-ml-py"} & set().union(
        *(expand(e) for e in control_extras.split(",") if e)
    )
    (gpu_extras,) = installs["gpu-host"]
    assert {"torch", "nvidia-ml-py"} <= set().union(*(expand(e) for e in gpu_extras.split(",")))
