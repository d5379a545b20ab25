"""Scheduler adapters: the exact scontrol argv, Kubernetes cordon + taint through CoreV1Api.patch_node, and
what each reports as held outside trainops."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from service.fleet.scheduler import REASON_ANNOTATION, TAINT_KEY, KubernetesAdapter, SlurmAdapter


class RecordingRunner:
    def __init__(self, stdout: str = "") -> None:
        self.calls: list[list[str]] = []
        self.stdout = stdout

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        return self.stdout


def test_slurm_drain_and_resume_run_scontrol_with_the_reason_as_one_argument() -> None:
    runner = RecordingRunner()
    slurm = SlurmAdapter(run=runner)
    slurm.cordon("node017", "hard fault: nvml.ecc: GPU 3: 1 uncorrectable\n(double-bit) ECC error")
    slurm.uncordon("node017", "repaired")
    assert runner.calls == [
        [
            "scontrol",
            "update",
            "NodeName=node017",
            "State=DRAIN",
            "Reason=trainops: hard fault: nvml.ecc: GPU 3: 1 uncorrectable (double-bit) ECC error",
        ],
        ["scontrol", "update", "NodeName=node017", "State=RESUME"],
    ]


def sinfo_json(*nodes: tuple[str, list[str], str]) -> str:
    """``sinfo --json`` as Slurm 23 writes it: per node its state list (base state and flags) and reason."""
    return json.dumps({"nodes": [{"name": n, "state": states, "reason": r} for n, states, r in nodes]})


def test_slurm_nodes_held_outside_trainops_are_other_drains_and_outages() -> None:
    runner = RecordingRunner(
        sinfo_json(
            ("node001", ["IDLE", "DRAIN"], "trainops: hard fault"),
            ("node002", ["IDLE", "DRAIN"], "bad DIMM, ticket 4411"),
            ("node003", ["DOWN", "NOT_RESPONDING"], "Not responding"),  # sinfo shows it as down*
            ("node004", ["IDLE"], ""),
            ("node005", ["DOWN", "DRAIN"], "trainops: hard fault"),  # our drain, then the node died
            ("node006", ["IDLE", "POWERED_DOWN"], ""),  # power saving: powers up when a job asks
            ("node007", ["FAIL"], "PSU alarm"),
        )
    )
    nodes = SlurmAdapter(run=runner).external_states()
    assert runner.calls == [["sinfo", "--json"]]
    assert nodes.known == {f"node00{i}" for i in range(1, 8)}
    assert nodes.held == {"node001", "node002", "node005"} and nodes.ours == {"node001", "node005"}
    assert {host: (hold.condition, hold.reason) for host, hold in nodes.outside.items()} == {
        "node002": ("drained outside trainops", "bad DIMM, ticket 4411"),
        "node003": ("down", "Not responding"),
        "node005": ("down", "trainops: hard fault"),
        "node007": ("down", "PSU alarm"),
    }
    assert nodes.outside["node003"].evidence["slurm_states"] == ["DOWN", "NOT_RESPONDING"]


class FakeCoreV1Api:
    """The CoreV1Api methods the adapter uses, applying patches to in-memory nodes like the API server."""

    def __init__(self, names: list[str]) -> None:
        self.nodes = {
            n: {"metadata": {"name": n, "annotations": {}}, "spec": {"unschedulable": False, "taints": []}}
            for n in names
        }
        self.patches: list[tuple[str, dict[str, Any]]] = []

    @staticmethod
    def _obj(node: dict[str, Any]) -> SimpleNamespace:
        taints = [SimpleNamespace(**t) for t in node["spec"]["taints"]] or None
        return SimpleNamespace(
            metadata=SimpleNamespace(
                name=node["metadata"]["name"], annotations=dict(node["metadata"]["annotations"])
            ),
            spec=SimpleNamespace(unschedulable=node["spec"]["unschedulable"], taints=taints),
        )

    def read_node(self, name: str) -> SimpleNamespace:
        return self._obj(self.nodes[name])

    def list_node(self) -> SimpleNamespace:
        return SimpleNamespace(items=[self._obj(n) for n in self.nodes.values()])

    def patch_node(self, name: str, body: dict[str, Any]) -> SimpleNamespace:
        self.patches.append((name, body))
        node = self.nodes[name]
        for key, value in body.get("metadata", {}).get("annotations", {}).items():
            if value is None:
                node["metadata"]["annotations"].pop(key, None)
            else:
                node["metadata"]["annotations"][key] = value
        node["spec"].update(body.get("spec", {}))
        return self._obj(node)


def test_kubernetes_cordon_marks_unschedulable_taints_and_keeps_other_taints() -> None:
    api = FakeCoreV1Api(["gpu-node-1", "gpu-node-2"])
    api.nodes["gpu-node-1"]["spec"]["taints"] = [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    k8s = KubernetesAdapter(api)
    k8s.cordon("gpu-node-1", "hard fault: nvml.xid: GPU 5 XID 79 (GPU has fallen off the bus)")
    node = api.nodes["gpu-node-1"]
    assert node["spec"]["unschedulable"] is True
    assert {t["key"] for t in node["spec"]["taints"]} == {"nvidia.com/gpu", TAINT_KEY}
    ours = next(t for t in node["spec"]["taints"] if t["key"] == TAINT_KEY)
    assert ours["effect"] == "NoSchedule" and len(ours["value"]) <= 63 and " " not in ours["value"]
    assert "XID 79" in node["metadata"]["annotations"][REASON_ANNOTATION]
    assert api.nodes["gpu-node-2"]["spec"]["unschedulable"] is False  # nothing else touched

    k8s.uncordon("gpu-node-1", "repaired")
    assert node["spec"]["unschedulable"] is False
    assert [t["key"] for t in node["spec"]["taints"]] == ["nvidia.com/gpu"]
    assert REASON_ANNOTATION not in node["metadata"]["annotations"]


def test_kubernetes_nodes_held_outside_trainops_are_cordons_without_our_taint() -> None:
    api = FakeCoreV1Api(["a", "b", "c"])
    KubernetesAdapter(api).cordon("a", "ecc")
    api.nodes["b"]["spec"]["unschedulable"] = True  # `kubectl cordon b` by an admin
    nodes = KubernetesAdapter(api).external_states()
    assert nodes.known == {"a", "b", "c"} and nodes.held == {"a", "b"} and nodes.ours == {"a"}
    assert {host: (hold.condition, hold.reason) for host, hold in nodes.outside.items()} == {
        "b": ("drained outside trainops", "cordoned outside trainops")
    }
