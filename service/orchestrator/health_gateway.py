"""What the orchestrator asks of fleet health: cordon, blame, deep-check hosts.

The protocol only; the implementation that changes node state is service/fleet/gateway.py
(``SweepHealthGateway``, with the scheduler adapters of the settings, Slurm's included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class HealthGateway(Protocol):
    def cordon(
        self,
        hosts: Sequence[str],
        *,
        reason: str,
        evidence: dict[str, Any],
        run_id: int | None,
        offence: str = "hardware",
    ) -> None:
        """Cordon `hosts` for a hardware failure of theirs (an `offence` of that kind: it counts to their
        lemon score; a lemon is retired instead)."""
        ...

    def blame(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> None:
        """`hosts` are the likely cause of a hang: suspect (to be checked), or retired as a lemon."""
        ...

    def deep_check(self, hosts: Sequence[str], *, deadline_s: float) -> dict[str, bool]:
        """Run deep diagnostics on `hosts`, applying the cordon policy; host -> still fit to use."""
        ...
