"""Scheduler adapters: the exact scontrol argv, and Kubernetes cordon + taint through CoreV1Api.patch_node."""

from __future__ import annotations

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


def test_slurm_external_drains_are_those_not_made_by_us() -> None:
    runner = RecordingRunner("node001|trainops: hard fault\nnode002|bad DIMM, ticket 4411\n")
    assert SlurmAdapter(run=runner).external_drains() == {"node002": "bad DIMM, ticket 4411"}
    assert runner.calls[0][0] == "sinfo"


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


def test_kubernetes_external_drains_are_cordons_without_our_taint() -> None:
    api = FakeCoreV1Api(["a", "b"])
    KubernetesAdapter(api).cordon("a", "ecc")
    api.nodes["b"]["spec"]["unschedulable"] = True  # `kubectl cordon b` by an admin
    assert KubernetesAdapter(api).external_drains() == {"b": "cordoned outside trainops"}
