"""Trainer components on their own: LR schedule, loss scaler, data stream, tokenizer, fault specs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors

from trainer.data import DEFAULT_CORPUS, TokenStream, prepare_tokens, read_documents
from trainer.faults import FaultInjector, parse_fault
from trainer.precision import DynamicLossScaler, FP16ParamAdam, opt_predivide_factors, opt_scale_window
from trainer.schedule import LRSchedule


def test_lr_warms_up_linearly_then_decays_to_ten_percent_of_peak() -> None:
    s = LRSchedule(peak_lr=6e-4, warmup_steps=10, total_steps=110)
    assert s.lr_at(1) == pytest.approx(6e-5) and s.lr_at(10) == pytest.approx(6e-4)
    assert s.lr_at(60) == pytest.approx(6e-4 * (1 - 0.9 * 0.5))
    assert s.lr_at(110) == pytest.approx(6e-5) and s.lr_at(500) == pytest.approx(6e-5)
    s.scale = 0.5  # a mid-flight LR cut scales the whole curve
    assert s.lr_at(10) == pytest.approx(3e-4)


def test_loss_scale_halves_on_overflow_grows_after_a_clean_window_and_has_a_floor() -> None:
    scaler = DynamicLossScaler.for_precision("fp16-mixed", initial=8.0, window=3, floor=2.0)
    scaler.update(overflow=True)
    assert scaler.scale == 4.0
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(overflow=True)
    assert scaler.scale == 2.0 and scaler.overflows == 6
    bf16 = DynamicLossScaler.for_precision("bf16", initial=8.0, window=3, floor=2.0)
    bf16.update(overflow=True)
    assert bf16.scale == 1.0 and bf16.overflows == 1  # counted, never scaled
    assert not scaler.floor_reached  # fp16-mixed clamps and keeps skipping steps at its floor


def test_opts_loss_scale_window_comes_from_data_parallel_size_and_update_frequency() -> None:
    assert opt_scale_window(124, 1) == 132  # OPT-175B: 992 GPUs / tensor parallelism 8
    assert opt_scale_window(2, 1) == 8192 and opt_scale_window(8, 4) == 512 and opt_scale_window(3, 7) == 780
    assert opt_scale_window(1024, 64) == 1  # never 0 (metaseq's int() would be, and divide by it)
    fp16 = DynamicLossScaler.resolve(
        "fp16", initial=None, window=None, floor=None, data_parallel=124, update_freq=1
    )
    assert (fp16.scale, fp16.window, fp16.floor, fp16.enabled, fp16.stop_at_floor) == (
        4.0,
        132,
        1e-4,
        True,
        True,
    )
    mixed = DynamicLossScaler.resolve(
        "fp16-mixed", initial=None, window=None, floor=None, data_parallel=124, update_freq=1
    )
    assert (mixed.scale, mixed.window, mixed.floor, mixed.stop_at_floor) == (65536.0, 1000, 1e-4, False)
    given = DynamicLossScaler.resolve(
        "fp16", initial=128.0, window=256, floor=2**-5, data_parallel=2, update_freq=1
    )
    assert (given.scale, given.window, given.floor) == (128.0, 256, 2**-5)
    bf16 = DynamicLossScaler.resolve(
        "bf16", initial=None, window=None, floor=None, data_parallel=2, update_freq=1
    )
    assert bf16.scale == 1.0 and not bf16.enabled


def test_at_its_floor_opts_scaler_stops_instead_of_clamping() -> None:
    scaler = DynamicLossScaler.resolve(
        "fp16", initial=None, window=None, floor=None, data_parallel=2, update_freq=1
    )
    for k in range(1, 16):  # 4 -> 2^-13 (1.2e-4 > 1e-4): fifteen overflows are only skipped steps
        scaler.update(overflow=True)
        assert scaler.scale == 4.0 / 2**k and not scaler.floor_reached
    scaler.update(overflow=True)  # the sixteenth would take it to 2^-14 <= 1e-4: metaseq stopped here
    assert scaler.floor_reached and scaler.scale == 2.0**-13 and scaler.overflows == 16
    exact = DynamicLossScaler.for_precision("fp16", initial=4.0, window=3, floor=2.0)
    exact.update(overflow=True)  # 4 -> 2 <= floor 2 (metaseq's `<=`): stop, the scale stays 4
    assert exact.floor_reached and exact.scale == 4.0
    # a clean window doubles it as before, and the state round-trips (exact resume)
    grown = DynamicLossScaler.for_precision("fp16", initial=4.0, window=3, floor=1e-4)
    for _ in range(3):
        grown.update(overflow=False)
    assert grown.scale == 8.0 and grown.clean_steps == 0
    grown.update(overflow=False)
    again = DynamicLossScaler.for_precision("fp16", initial=4.0, window=3, floor=1e-4)
    again.load_state_dict(grown.state_dict())
    assert (again.scale, again.clean_steps) == (8.0, 1)


@pytest.mark.parametrize(
    ("world", "factors"),
    [(1, (1.0, 1.0)), (2, (2.0, 1.0)), (8, (4.0, 2.0)), (16, (4.0, 4.0)), (124, (8.0, 15.5))],
)
def test_fp16_gradients_are_divided_before_and_after_the_reduction_as_fairscale_did(
    world: int, factors: tuple[float, float]
) -> None:
    assert opt_predivide_factors(world) == factors
    # FSDP2 divides an fp16 reduction by the same factors (what `--precision fp16` relies on)
    group = SimpleNamespace(size=lambda: world)
    pre, post, *_ = _get_gradient_divide_factors(group, None, torch.float16)  # type: ignore[arg-type]
    assert (pre, post) == factors


def _metaseq_adam_step(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float, wd: float
) -> torch.Tensor:
    """metaseq's Adam (optim/adam.py) on one fp32 tensor, betas (0.9, 0.95), eps 1e-8."""
    m.mul_(0.9).add_(g, alpha=1 - 0.9)
    v.mul_(0.95).addcmul_(g, g, value=1 - 0.95)
    denom = v.sqrt().add_(1e-8)
    p.add_(p, alpha=-wd * lr)
    p.addcdiv_(m, denom, value=-lr * math.sqrt(1 - 0.95**t) / (1 - 0.9**t))
    return p


def test_fp16_parameters_take_metaseqs_adam_step_in_fp32_and_keep_fp32_moments() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(64, 32, generator=gen).half())
    bias = torch.nn.Parameter(torch.randn(32, generator=gen).half())
    opt = FP16ParamAdam(
        [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    ref = {"w": (weight.detach().float(), torch.zeros(64, 32), torch.zeros(64, 32), 0.1)}
    ref["b"] = (bias.detach().float(), torch.zeros(32), torch.zeros(32), 0.0)
    for t in (1, 2, 3):
        scaled = {"w": torch.randn(64, 32, generator=gen) * 4096, "b": torch.randn(32, generator=gen) * 4096}
        weight.grad, bias.grad = scaled["w"].half(), scaled["b"].half()
        opt.step(grad_multiplier=1 / 4096)
        for name, param in (("w", weight), ("b", bias)):
            p, m, v, wd = ref[name]
            # the reference sees what the optimizer saw: the fp16 gradient, unscaled in fp32
            _metaseq_adam_step(p, param.grad.float() / 4096, m, v, t, 1e-2, wd)
            assert param.dtype == torch.float16
            assert torch.equal(param.detach(), p.half()), (name, t)
            p.copy_(param.detach().float())  # the parameter is rounded to fp16 after every step (no master)
    state = opt.state[weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32 and state["step"].item() == 3
    assert torch.equal(state["exp_avg"], ref["w"][1]) and torch.equal(state["exp_avg_sq"], ref["w"][2])

    # torch would cast the moments to the parameters' fp16 on load; they stay the checkpoint's fp32 values
    saved = opt.state_dict()
    fresh = FP16ParamAdam(
        [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=1e-2
    )
    fresh.load_state_dict(saved)
    loaded = fresh.state[weight]
    assert loaded["exp_avg"].dtype == torch.float32 and torch.equal(loaded["exp_avg_sq"], state["exp_avg_sq"])
    assert loaded["exp_avg"] is not state["exp_avg"] and loaded["step"].item() == 3


def test_shipped_corpus_trains_a_byte_level_bpe_and_is_cached(tmp_path: Path) -> None:
    documents = read_documents(None)  # one per file
    assert len(documents) == 11 and DEFAULT_CORPUS.is_dir()
    assert 100_000 < len("".join(documents).encode()) < 400_000
    tok_path, ids_path = prepare_tokens(corpus=None, cache_dir=tmp_path, vocab_size=1024, tokenizer_dir=None)
    tok = Tokenizer.from_file(str(tok_path))
    assert tok.get_vocab_size() == 1024 and tok.token_to_id("</s>") == 2
    sample = "Checkpoints must therefore be trustworthy."
    assert tok.decode(tok.encode(sample).ids) == sample  # byte-level: lossless
    ids = np.load(ids_path)
    assert ids.max() < 1024 and len(ids) > 30_000 and ids[-1] == 2 and (ids == 2).sum() == 11
    mtime = ids_path.stat().st_mtime_ns
    assert prepare_tokens(corpus=None, cache_dir=tmp_path, vocab_size=1024, tokenizer_dir=None)[1] == ids_path
    assert ids_path.stat().st_mtime_ns == mtime


def test_batches_are_a_pure_function_of_position_and_independent_of_the_split() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    stream = TokenStream(tokens, seq_len=16, seed=1)
    again = TokenStream(tokens, seq_len=16, seed=1)
    one = stream.batch(step_index=7, micro_index=0, rank=0, world=1, micro_batch=8, accum_steps=1)
    assert torch.equal(
        one.inputs,
        again.batch(step_index=7, micro_index=0, rank=0, world=1, micro_batch=8, accum_steps=1).inputs,
    )
    split = [
        stream.batch(step_index=7, micro_index=m, rank=r, world=2, micro_batch=2, accum_steps=2)
        for m in (0, 1)
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat([b.inputs for b in split]), one.inputs)
    assert torch.equal(one.targets[:, :-1], one.inputs[:, 1:])
    first_epoch = {int(stream.sequence(i)[0]) for i in range(stream.n_windows)}
    assert len(first_epoch) == stream.n_windows  # every window once per epoch
    assert not torch.equal(stream.sequence(0), stream.sequence(stream.n_windows))  # reshuffled next epoch


def test_fault_specs() -> None:
    crash = parse_fault("crash:step=12,rank=1,signal=KILL")
    assert (crash.kind, crash.step, crash.rank, crash.kill) == ("crash", 12, 1, True)
    assert parse_fault("diverge:step=3").rank is None and parse_fault("diverge:step=3").factor == 100.0
    with pytest.raises(ValueError, match="does not take"):
        parse_fault("hang:step=1,code=3")
    injector = FaultInjector(["diverge:step=5,factor=10", "crash:step=2,rank=1"], rank=0, log=lambda _: None)
    assert [injector.lr_factor(s) for s in (4, 5, 9)] == [1.0, 10.0, 10.0]
    injector.at_step_start(2)  # rank 1's crash is not ours: returns
