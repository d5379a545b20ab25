"""The control side of fleet health: sweeps, the cordon policy, fabric rounds, scheduler adapters and the
one gateway that changes node state. The host agent (health/) runs the checks; this package judges them."""
