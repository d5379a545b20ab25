"""Launchers: how attempts are started, observed and killed. `base` (the protocol and what every launcher
shares), `local` (torchrun on this machine), `slurm` (Slurm batch jobs)."""
