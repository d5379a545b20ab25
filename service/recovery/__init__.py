"""Recovery rules and the read models the API and the orchestrator share: divergence and failure detection
(`detect`), the restart rule (`restart_point`), checkpoint verdicts and pins (`verdicts`), restart-preview
(`preview`), the stored observations they read (`samples`) and the typed config that parameterises them
(`config`). Below the orchestrator: nothing here imports `service.orchestrator`."""
