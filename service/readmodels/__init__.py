"""Read models: figures computed from the control plane's stored rows, shared by the API, the CLI and the
Prometheus collector (service/metrics_collector.py). They read through crud and the models only and import
nothing of the orchestrator, so the orchestrator stays a leaf that only the CLI, the demo and its runtime
import."""
