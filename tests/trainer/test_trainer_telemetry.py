"""The training signals' own pieces in one process (world of one): what each measures, what it leaves out."""

from __future__ import annotations

import math
from collections.abc import Iterator

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
    GradientStats,
    NullActivationProbes,
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
