"""The training signals' own pieces in one process (world of one): what each measures, what it leaves out."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.contract import TRAINER_LAYER_GROUPS, TRAINER_SIGNAL_VALUES
from trainer.model import build_model, init_weights, preset_model_config
from trainer.telemetry import (
    LAYER_GROUPS,
    ActivationProbes,
    ClipCounter,
    CudaMemory,
    GradientStats,
    NullActivationProbes,
    NullCudaMemory,
    StepStats,
    layer_group,
    reduce_step_stats,
)

CPU = torch.device("cpu")


@pytest.fixture
def world_of_one() -> Iterator[None]:
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_parameter_of_every_depth_has_a_layer_group() -> None:
    assert LAYER_GROUPS == TRAINER_LAYER_GROUPS
    for preset, n_layers in (("tiny", 2), ("small", 4), ("175B", 96)):
        model = build_model(preset_model_config(preset))  # on the meta device: nothing allocated
        groups = {name: layer_group(name, n_layers) for name, _ in model.named_parameters()}
        assert set(groups.values()) == set(LAYER_GROUPS), preset
        # the final block is always in the upper half, the first in the lower
        assert groups[f"layers.{n_layers - 1}.fc2.weight"] == "upper"
        assert groups["layers.0.fc1.weight"] == "lower"
    with pytest.raises(ValueError, match="no layer group"):
        layer_group("lm_head.weight", 2)


def test_one_step_of_signals_in_one_process(world_of_one: None) -> None:
    """A 1-block model: the signals by their definitions, the empty `lower` group absent, validation passes
    not counted, and telemetry off measuring the same gradient norm with nothing else."""
    model = build_model(preset_model_config("tiny", n_layers=1, dropout=0.0), device="cpu")
    init_weights(model, 3)
    probes = ActivationProbes(model, CPU)
    detailed = GradientStats(model, n_layers=1, detailed=True)
    plain = GradientStats(model, n_layers=1, detailed=False)
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(tokens)  # a validation pass: the probes ignore it
    assert probes.take().abs().sum().item() == 0
    model.train()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()

    stats = reduce_step_stats(
        loss.detach(),
        probes.take(),
        detailed.local_sums(),
        1,
        maxima=detailed.local_maxima(),
        group_numel=detailed.group_numel,
    )
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert stats.grad_norm == pytest.approx(grads.double().norm().item(), rel=1e-5)  # fp32 norms per tensor
    assert set(stats.gnorm) == set(stats.gmax) == set(stats.gzero) == {"embed", "upper", "head"}
    head = torch.cat([p.grad for p in model.final_layer_norm.parameters()])
    assert stats.gmax["head"] == head.max().item()
    assert (
        stats.gzero["head"] == (head.abs() < 2 * torch.finfo(torch.float32).tiny).sum().item() / head.numel()
    )
    values = stats.values()
    assert "gnorm_lower" not in values and set(values) <= set(TRAINER_SIGNAL_VALUES)
    assert values["loss_bits"] == pytest.approx(loss.item() / math.log(2))
    assert stats.actv_norm is not None and stats.act_norm is not None
    assert stats.actv_norm <= stats.act_norm
    # nothing accumulated past the take: the next step starts from zero
    assert probes.take().abs().sum().item() == 0

    off = reduce_step_stats(loss.detach(), NullActivationProbes(CPU).take(), plain.local_sums(), 1)
    assert off.grad_norm == pytest.approx(stats.grad_norm, rel=1e-12)
    assert off == StepStats(loss=off.loss, grad_norm=off.grad_norm)  # nothing else measured
    assert set(off.values()) == {"loss_bits"}


def test_clip_share_counts_steps_above_the_clip_over_a_window() -> None:
    counter = ClipCounter(window=4)
    assert counter.observe(2.0, 1.0) == {"clipped": 1.0, "clip_frac": 1.0}
    assert counter.observe(1.0, 1.0) == {"clipped": 0.0, "clip_frac": 0.5}  # metaseq: strictly above
    assert counter.observe(math.inf, 1.0) == {}  # an overflow step is not measured
    counter.observe(0.5, 1.0)
    counter.observe(0.5, 1.0)
    assert counter.observe(0.5, 1.0) == {"clipped": 0.0, "clip_frac": 0.0}  # the clipped step left the window


def test_fp16_gradient_zero_share_and_parameter_norm_do_not_depend_on_the_loss_scale_or_fp16(
    world_of_one: None,
) -> None:
    """OPT's format keeps its gradients scaled in fp16 and its parameters in fp16. The same gradient at loss
    scale 4 and at 4096 is the same step: its near-zero share (metaseq's, of the unscaled gradient) is the
    same, and the parameter norm is accumulated in fp32 (fp16 keeps three digits and overflows past 65504)."""
    model = build_model(preset_model_config("tiny", n_layers=1, dropout=0.0), device="cpu")
    init_weights(model, 3)
    model.half()
    with torch.no_grad():
        model.embed_tokens.weight[:32].fill_(1500.0)  # a tensor whose norm (67882) passes 65504
    stats = GradientStats(model, n_layers=1, detailed=True)
    gen = torch.Generator().manual_seed(1)
    # the unscaled gradient: a quarter of its elements far below metaseq's threshold (2 x fp16's smallest
    # normal, 1.2e-4), the rest far above; none near it, so the share is exact
    true = {}
    for name, p in model.named_parameters():
        magnitude = torch.where(torch.rand(p.shape, generator=gen) < 0.25, 1e-6, 1e-2)
        true[name] = magnitude * torch.randn(p.shape, generator=gen).sign()
    shares = []
    for scale in (4.0, 4096.0):
        for name, p in model.named_parameters():
            p.grad = (true[name] * scale).half()  # what backward of scale x loss leaves
        sums = stats.local_sums(unscale=1 / scale)
        reduced = reduce_step_stats(torch.zeros(()), torch.zeros(7), sums, 1, group_numel=stats.group_numel)
        shares.append(reduced.gzero)
    for group in ("embed", "upper", "head"):
        flat = torch.cat([t.flatten() for n, t in true.items() if layer_group(n, 1) == group])
        expected = (flat.abs() < 2 * torch.finfo(torch.float16).tiny).double().mean().item()
        assert shares[0][group] == shares[1][group] == pytest.approx(expected, abs=1e-12), group
    exact = torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters())).item()
    assert reduced.param_norm == pytest.approx(exact, rel=1e-5)  # fp32 sums; fp16 keeps 5e-4


def test_gpu_memory_is_each_steps_peak_and_the_fullest_rank_wins(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metaseq's `cuda_gb_*` on a (simulated) 80 GiB GPU: the peaks since the previous step, reset after each
    take; over the ranks the largest allocated and reserved, and the smallest free (the rank nearest to an
    out-of-memory error)."""
    gib = 2**30
    device = torch.device("cuda", 3)
    peaks = {"allocated": 30 * gib, "reserved": 40 * gib}
    resets: list[torch.device] = []
    seen: list[torch.device] = []

    def peak(kind: str):  # the device asked about, then the current peak of `kind`
        def read(dev: torch.device) -> int:
            seen.append(dev)
            return peaks[kind]

        return read

    def reset(dev: torch.device) -> None:
        resets.append(dev)
        peaks.update(allocated=0, reserved=0)

    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=80 * gib)
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak("allocated"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", peak("reserved"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)

    memory = CudaMemory(device)
    assert resets == [device]  # start-up's peak (loading, sharding) is not the first step's
    peaks.update(allocated=30 * gib, reserved=40 * gib)
    assert memory.take() == [30.0, 40.0, -50.0]
    assert set(seen) == {device} and resets == [device, device]
    peaks.update(allocated=gib // 2, reserved=gib)  # a lighter step reports its own peak, not the last one's
    first = memory.take()
    assert first == [0.5, 1.0, -79.5]
    assert NullCudaMemory().take() == []

    # another rank's step was fuller: its allocated and reserved peaks, and its (smaller) free memory win
    other_rank = torch.tensor([0.0] * len(LAYER_GROUPS) + [70.0, 75.0, -10.0], dtype=torch.float64)
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, **kwargs: object) -> None:
        real_all_reduce(tensor, op=op, **kwargs)
        if op == dist.ReduceOp.MAX:
            tensor.copy_(torch.maximum(tensor, other_rank[-len(tensor) :]))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    n = len(LAYER_GROUPS)
    sums = torch.zeros(2 * n + 1, dtype=torch.float64)
    stats = reduce_step_stats(torch.zeros(()), torch.zeros(7), sums, 1, memory=first, group_numel=[1] * n)
    assert (stats.cuda_gb_allocated, stats.cuda_gb_reserved, stats.cuda_gb_free) == (70.0, 75.0, 10.0)
    values = stats.values()
    assert {k: values[k] for k in ("cuda_gb_allocated", "cuda_gb_reserved", "cuda_gb_free")} == {
        "cuda_gb_allocated": 70.0,
        "cuda_gb_reserved": 75.0,
        "cuda_gb_free": 10.0,
    }
    assert set(values) <= set(TRAINER_SIGNAL_VALUES)
