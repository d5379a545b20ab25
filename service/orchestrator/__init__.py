"""The orchestrator: a level-triggered reconcile loop that keeps runs going with no one awake.

observe (attempt processes, heartbeats, metrics, node states, checkpoints) -> decide (pure) ->
apply (idempotent) -> record (a logbook entry with evidence for every decision).
"""
