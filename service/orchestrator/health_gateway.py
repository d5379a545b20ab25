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
        retire: bool = True,
    ) -> list[str]:
        """Cordon `hosts` for a hardware failure of theirs (an `offence` of that kind: it counts to their
        lemon score; a lemon is retired instead, or without `retire` kept cordoned). Returns the lemons whose
        retirement was withheld."""
        ...

    def blame(
        self, hosts: Sequence[str], *, reason: str, run_id: int | None, retire: bool = True
    ) -> list[str]:
        """`hosts` are the likely cause of a hang: suspect (to be checked), or retired as a lemon (without
        `retire`, cordoned). Returns the lemons whose retirement was withheld."""
        ...

    def retire(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> list[str]:
        """Retire cordoned lemons (an operator approved it); returns the hosts retired."""
        ...

    def deep_check(self, hosts: Sequence[str], *, deadline_s: float) -> dict[str, bool]:
        """Run deep diagnostics on `hosts`, applying the cordon policy; host -> still fit to use."""
        ...
