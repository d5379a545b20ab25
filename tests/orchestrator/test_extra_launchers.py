"""TRAINOPS_EXTRA_LAUNCHERS: launchers loaded by import path beside local and slurm (the simulator's)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.orchestrator.runtime import available_launchers, load_launcher


def test_an_extra_launcher_is_offered_under_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINOPS_EXTRA_LAUNCHERS", "bench.fleet_sim:SimLauncher")
    launchers = available_launchers(Settings())
    assert set(launchers) == {"local", "sim"}
    assert type(launchers["sim"]).__name__ == "SimLauncher"


@pytest.mark.parametrize("value", ["bench.fleet_sim", "bench.fleet_sim:", ":SimLauncher", "a:b:c"])
def test_a_malformed_import_path_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TRAINOPS_EXTRA_LAUNCHERS", value)
    with pytest.raises(ValidationError, match="module:Class"):
        Settings()


def test_a_class_that_is_not_a_launcher_is_refused() -> None:
    with pytest.raises(TypeError, match="not a launcher"):
        load_launcher("json:JSONDecoder")
    with pytest.raises(ModuleNotFoundError):
        load_launcher("no_such_module_here:Launcher")
