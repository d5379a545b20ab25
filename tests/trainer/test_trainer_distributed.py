"""The trainer as the orchestrator sees it: real torchrun processes, two ranks, FSDP2 over gloo on CPU."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.schemas import HeartbeatBatch, MetricBatch
from tests.trainer_helpers import (
    explain,
    metrics,
    model_weights,
    optimizer_state,
    run_trainer,
    start_receiver,
    start_trainer,
)
from trainer.checkpoint import list_checkpoints, read_meta, verify_checkpoint
from trainer.contract import TRAINER_SIGNAL_VALUES
from trainer.data import TokenStream
from trainer.model import build_model, init_weights, preset_model_config

pytestmark = pytest.mark.slow
FP32 = ["--precision", "fp32"]


@pytest.fixture
def receiver() -> Any:
    server = start_receiver()
    yield server
    server.shutdown()


def beats_posted(receiver: Any, path: str) -> list[dict[str, Any]]:
    """The beats that arrived at `path`, in order; each request is a batch the control plane admits."""
    bodies = [body for posted, _, body in list(receiver.requests) if posted == path]
    return [beat for body in bodies for beat in HeartbeatBatch.model_validate(body).beats]


def test_two_ranks_learn_real_text_in_fp16_and_report_everything(tmp_path: Path, receiver: Any) -> None:
    run_dir = tmp_path / "run"
    env = {
        "TRAINOPS_API_URL": f"http://127.0.0.1:{receiver.server_port}",
        "TRAINOPS_TOKEN": "tok-1",
        "TRAINOPS_RUN_ID": "7",
        "TRAINOPS_ATTEMPT": "1",
        "TRAINOPS_HOSTS": "h1,h2",
    }
    result = run_trainer(
        run_dir,
        "--max-steps",
        "16",
        "--checkpoint-interval",
        "8",
        "--val-interval",
        "8",
        "--report-interval-s",
        "0.2",
        env=env,
    )
    assert result.returncode == 0, explain(result)

    points = metrics(run_dir)
    assert [p["step"] for p in points] == list(range(1, 17))
    first, last = np.mean([p["loss"] for p in points[:3]]), np.mean([p["loss"] for p in points[-3:]])
    assert last < first - 0.5, f"loss did not fall on the shipped corpus: {first:.3f} -> {last:.3f}"
    for p in points:  # fp16 is OPT's format: scale 4, window 2^14 / (2 ranks x 1 micro-batch) = 8192 steps
        assert p["loss_scale"] == 4.0 and math.isfinite(p["grad_norm"]) and p["act_norm"] > 0
        assert p["tokens_per_s"] > 0 and p["tflops_per_gpu"] > 0 and p["clip"] == 1.0 and p["lr"] > 0
    assert "val_loss" in points[7]["values"] and "val_ppl" in points[15]["values"]

    # both checkpoints are committed, self-describing
    infos = list_checkpoints(run_dir / "checkpoints")
    assert [(i.step, i.ok) for i in infos] == [(8, True), (16, True)]
    # each rank hashed the files it wrote (its DCP shards, its RNG state) itself; rank 0 only the rest
    manifest = json.loads((infos[-1].path / "manifest.json").read_text())
    hashed_by = {rel: entry["rank"] for rel, entry in manifest["files"].items()}
    assert manifest["world_size"] == 2 and set(manifest["ranks"]) == {"0", "1"}
    assert {rel: r for rel, r in hashed_by.items() if not rel.endswith(".distcp")} == {
        "rng_rank0.pt": 0,
        "rng_rank1.pt": 1,
        ".metadata": 0,
        "meta.json": 0,
    }
    shards = {rel: r for rel, r in hashed_by.items() if rel.endswith(".distcp")}
    assert {r for r in shards.values()} == {0, 1} and all(
        rel.startswith(f"__{r}_") for rel, r in shards.items()
    )
    meta = read_meta(infos[-1].path)
    assert (
        meta["tokens"] == 16 * 512 and meta["loss"] == points[-1]["loss"] and len(meta["loss_window"]) == 16
    )

    # rank 0 delivered every point, both checkpoints and heartbeats to the control plane, with its token
    posted = [(path, auth, body) for path, auth, body in receiver.requests]
    assert {auth for _, auth, _ in posted} == {"Bearer tok-1"}
    steps = [pt["step"] for path, _, b in posted if path == "/api/v1/runs/7/metrics" for pt in b["points"]]
    assert sorted(steps) == list(range(1, 17))
    # what the trainer sends is what the API admits, training signals included (docs/reporting-contract.md)
    sent = [MetricBatch.model_validate(b) for path, _, b in posted if path == "/api/v1/runs/7/metrics"]
    point = next(p for batch in sent for p in batch.points if p["step"] == 8)  # a validation step
    assert 0 < point["actv_norm"] <= point["act_norm"]
    assert set(TRAINER_SIGNAL_VALUES) - set(point["values"]) == {
        "cuda_gb_allocated",
        "cuda_gb_reserved",
        "cuda_gb_free",
    }
    registered = [b for path, _, b in posted if path == "/api/v1/runs/7/checkpoints"]
    assert [(b["step"], b["state"], b["attempt"]) for b in registered] == [
        (8, "committed", 1),
        (16, "committed", 1),
    ]
    assert registered[-1]["checksum"].startswith("sha256:") and registered[-1]["path"] == str(infos[-1].path)

    # every rank sent its own beats (what the control plane admits), the last one with its simulated host,
    # its final step and the per-step busy history of its last 16 steps
    newest = {b["rank"]: b for b in beats_posted(receiver, "/api/v1/runs/7/heartbeats")}
    assert [(r, b["host"], b["step"], b["section"]) for r, b in sorted(newest.items())] == [
        (0, "h1", 16, "step"),
        (1, "h2", 16, "step"),
    ]
    assert [s for s, _ in newest[1]["busy_s"]] == list(range(1, 17)) and newest[1]["last_step_s"] > 0
    # the host's two ranks in one request: local rank 0 relays rank 1's beats
    beat_bodies = [body for path, _, body in posted if path == "/api/v1/runs/7/heartbeats"]
    assert any([b["rank"] for b in body["beats"]] == [0, 1] for body in beat_bodies)
    assert (
        not (run_dir / "spool" / "pending.jsonl").exists()
        or not (run_dir / "spool" / "pending.jsonl").read_text()
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_after_a_crash_is_bitwise_identical_to_an_uninterrupted_run(
    tmp_path: Path, precision: str
) -> None:
    common = [
        *("--precision", precision),
        *("--max-steps", "20", "--checkpoint-interval", "10", "--checkpoint-mode", "sync"),
    ]
    if precision == "fp16":
        # The scaler's whole state must survive the crash: with a window of 5 clean steps the scale doubles
        # at step 5 (4 -> 8), an injected overflow halves it at step 8 (-> 4), the checkpoint of step 10
        # holds 2 clean steps, so after the resume it doubles at step 13 (-> 8) and 18 (-> 16). Restarting
        # the count from 0 would double it at step 15 instead.
        common += ["--loss-scale-window", "5", "--fault", "inf_grad:step=8,rank=1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert (r := run_trainer(straight, *common)).returncode == 0, explain(r)

    crashed = run_trainer(interrupted, *common, "--fault", "crash:step=14,rank=1,code=13")
    assert crashed.returncode == 13, explain(crashed)
    assert [p["step"] for p in metrics(interrupted)][-1] == 13
    resumed = run_trainer(interrupted, *common, "--resume-from", "latest", env={"TRAINOPS_ATTEMPT": "2"})
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout and "step_00000010 at step 10" in resumed.stdout
    # a synchronous save's manifest holds each rank's own digests too
    manifest = json.loads((interrupted / "checkpoints" / "step_00000020" / "manifest.json").read_text())
    assert manifest["files"]["__1_0.distcp"]["rank"] == 1 and manifest["world_size"] == 2

    a, b = metrics(straight), metrics(interrupted)
    assert [p["loss"] for p in a] == [
        p["loss"] for p in b
    ]  # steps 11..13 of attempt 1 superseded by attempt 2
    assert [p["grad_norm"] for p in a] == [p["grad_norm"] for p in b]
    assert [p["loss_scale"] for p in a] == [p["loss_scale"] for p in b]
    assert [p["attempt"] for p in b][10:] == [2] * 10
    if precision == "fp16":
        scales = [4.0] * 4 + [8.0] * 3 + [4.0] * 5 + [8.0] * 5 + [16.0] * 3
        assert [p["loss_scale"] for p in b] == scales
        assert [p["step"] for p in b if p["values"]["overflow"]] == [8]
        assert read_meta(interrupted / "checkpoints" / "step_00000010")["scaler"]["clean_steps"] == 2
    wa = model_weights(straight / "checkpoints" / "step_00000020", tmp_path)
    wb = model_weights(interrupted / "checkpoints" / "step_00000020", tmp_path)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = optimizer_state(straight / "checkpoints" / "step_00000020", tmp_path)
    ob = optimizer_state(interrupted / "checkpoints" / "step_00000020", tmp_path)
    assert oa.keys() == ob.keys() and oa
    for name in oa:
        assert torch.equal(oa[name], ob[name]), name
    if precision == "fp16":  # OPT's format: fp16 weights, fp32 Adam moments (what was saved is what ran)
        assert {w.dtype for w in wa.values()} == {torch.float16}
        moments = {v.dtype for k, v in oa.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
        assert moments == {torch.float32}


def test_a_checkpoint_torn_by_a_kill_mid_save_is_never_loaded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*FP32, "--max-steps", "8", "--checkpoint-interval", "4"]
    torn = run_trainer(run_dir, *common, "--fault", "crash_in_checkpoint:step=8")
    assert torn.returncode == 128 + signal.SIGKILL, explain(torn)

    infos = {i.step: i for i in list_checkpoints(run_dir / "checkpoints")}
    assert infos[4].ok and not infos[8].ok and "COMMITTED" in infos[8].reason
    assert (
        run_dir / "checkpoints" / "step_00000008" / "manifest.json"
    ).exists()  # all files there, no marker

    resumed = run_trainer(run_dir, *common, "--resume-from", "latest")
    assert resumed.returncode == 0, explain(resumed)
    assert "step_00000004 at step 4" in resumed.stdout
    assert verify_checkpoint(run_dir / "checkpoints" / "step_00000008") == (True, "ok")


def test_an_inf_gradient_on_one_rank_makes_every_rank_skip_and_halve(tmp_path: Path) -> None:
    """fp16 (OPT's format) and fp16-mixed alike: one rank's inf is every rank's overflow."""
    run_dir = tmp_path / "run"
    result = run_trainer(
        run_dir,
        "--max-steps",
        "4",
        "--checkpoint-interval",
        "1",
        "--checkpoint-mode",
        "sync",
        "--fault",
        "inf_grad:step=3,rank=1",
    )
    assert result.returncode == 0, explain(result)
    for rank in (0, 1):
        seen = [(p["step"], p["loss_scale"], p["values"]["overflow"]) for p in metrics(run_dir, rank)]
        assert seen == [(1, 4.0, 0.0), (2, 4.0, 0.0), (3, 2.0, 1.0), (4, 2.0, 0.0)], rank
    assert math.isinf(metrics(run_dir)[2]["grad_norm"])
    before = model_weights(run_dir / "checkpoints" / "step_00000002", tmp_path)
    after = model_weights(run_dir / "checkpoints" / "step_00000003", tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped on every shard
    assert read_meta(run_dir / "checkpoints" / "step_00000003")["scaler"]["overflows"] == 1


def test_at_the_loss_scale_floor_fp16_stops_with_its_own_exit_after_flushing_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # OPT's scale 4 with a floor of 1: the first overflow halves it to 2, the second would reach the floor
    faults = ["--fault", "inf_grad:step=2,rank=1", "--fault", "inf_grad:step=3,rank=0"]
    result = run_trainer(run_dir, "--max-steps", "30", "--min-loss-scale", "1", *faults)
    assert result.returncode == 43, explain(result)
    for rank in (0, 1):  # the same verdict on every rank, the step's point flushed first
        seen = [(p["step"], p["loss_scale"], p["values"]["overflow"]) for p in metrics(run_dir, rank)]
        assert seen == [(1, 4.0, 0.0), (2, 2.0, 1.0), (3, 2.0, 1.0)], rank
        assert [p["values"].get("loss_scale_floor") for p in metrics(run_dir, rank)] == [None, None, 1.0]
    log = (run_dir / "trainer.log").read_text()
    assert "loss scale floor: an overflow at step 3" in log and "exiting 43" in log


def test_fp16_mixed_keeps_its_scale_and_clamps_at_the_floor(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    faults = ["--fault", "inf_grad:step=2,rank=1", "--fault", "inf_grad:step=3,rank=0"]
    flags = ["--precision", "fp16-mixed", "--max-steps", "4", "--min-loss-scale", "32768", *faults]
    result = run_trainer(run_dir, *flags)
    assert result.returncode == 0, explain(result)
    seen = [(p["step"], p["loss_scale"], p["values"]["overflow"]) for p in metrics(run_dir)]
    assert seen == [(1, 65536.0, 0.0), (2, 32768.0, 1.0), (3, 32768.0, 1.0), (4, 32768.0, 0.0)]
    assert "fp16 (OPT)" not in (run_dir / "trainer.log").read_text()


def test_training_signals_match_a_single_process_reference(tmp_path: Path) -> None:
    """Every signal the trainer reports, from two FSDP ranks, against the same step computed in one process by
    their definitions (metaseq's, docs/reporting-contract.md), written out here independently."""
    run_dir = tmp_path / "run"
    clip = 0.5
    flags = [*FP32, "--max-steps", "1", "--dropout", "0", "--seed", "5", "--clip", str(clip)]
    result = run_trainer(run_dir, *flags)
    assert result.returncode == 0, explain(result)
    reported = metrics(run_dir)[0]
    values = reported["values"]

    # The same step in one process: same init (seeded, shard-independent), both ranks' micro-batches at once.
    tokens = np.load(next((run_dir / "cache").glob("tokens-*.npy")))
    stream = TokenStream(tokens, seq_len=128, seed=5)
    batches = [
        stream.batch(step_index=0, micro_index=0, rank=r, world=2, micro_batch=2, accum_steps=1)
        for r in (0, 1)
    ]
    inputs = torch.cat([b.inputs for b in batches])
    targets = torch.cat([b.targets for b in batches])
    model = build_model(preset_model_config("tiny", dropout=0.0), device="cpu")
    init_weights(model, 5)
    seen: dict[str, torch.Tensor] = {}
    for name, module in (
        ("actv", model.final_block),
        ("tok", model.embed_tokens),
        ("pos", model.embed_positions),
    ):
        module.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.detach()))
    param_norm = torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters()))
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))

    per_token = seen["actv"].double().norm(dim=-1)  # (batch, seq): each token's L2 norm
    assert reported["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert values["loss_bits"] == pytest.approx(loss.item() / math.log(2), rel=1e-5)
    assert reported["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    assert reported["actv_norm"] == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert reported["act_norm"] == pytest.approx(per_token.square().mean().sqrt().item(), rel=1e-5)
    assert reported["actv_norm"] < reported["act_norm"]  # the tokens' norms differ: mean < RMS
    tok, pos = seen["tok"].double(), seen["pos"].double()  # (batch, seq, d) and (seq, d)
    assert values["tok_norm"] == pytest.approx(tok.norm(dim=-1).mean().item(), rel=1e-5)
    assert values["pos_norm"] == pytest.approx(pos.norm(dim=-1).mean().item(), rel=1e-5)
    assert values["emb_norm"] == pytest.approx((tok + pos).norm(dim=-1).mean().item(), rel=1e-5)
    assert values["param_norm"] == pytest.approx(param_norm.item(), rel=1e-6)

    # the tiny preset has 2 blocks: block 0 is the lower half, block 1 the upper
    groups = {"embed": ("embed_",), "lower": ("layers.0.",), "upper": ("layers.1.",), "head": ("final_",)}
    # The key bias's gradient is zero in exact arithmetic (a bias on every key shifts each query's scores
    # by one constant, which softmax removes): in fp32 it is rounding noise around 0, exactly 0 or not
    # depending on the summation order (threads, ranks). Those elements may count either way.
    d_model = 64
    key_bias = {f"layers.{i}.attn.qkv.bias": slice(d_model, 2 * d_model) for i in (0, 1)}
    for group, prefixes in groups.items():
        named = [(n, p.grad.double().clone()) for n, p in model.named_parameters() if n.startswith(prefixes)]
        flat = torch.cat([g.flatten() for _, g in named])
        for name, grad in named:
            if name in key_bias:
                grad[key_bias[name]] = 1.0  # never near zero: counted apart
        undecided = sum(d_model for name, _ in named if name in key_bias)
        sure = (torch.cat([g.flatten() for _, g in named]).abs() < 2 * torch.finfo(torch.float32).tiny).sum()
        assert values[f"gnorm_{group}"] == pytest.approx(flat.norm().item(), rel=1e-4), group
        assert values[f"gmax_{group}"] == pytest.approx(flat.max().item(), rel=1e-4), group
        zero_count = round(values[f"gzero_{group}"] * flat.numel())
        assert sure.item() <= zero_count <= sure.item() + undecided, group
    # the embedding's only zero gradients: the position table's two rows no position reads (OPT's layout;
    # every token row gets some through the tied output projection)
    embed_rows = 2048 + 128 + 2
    assert values["gzero_embed"] * d_model * embed_rows == pytest.approx(2 * d_model)
    # the groups' norms make up the whole gradient's
    assert math.hypot(*(values[f"gnorm_{g}"] for g in groups)) == pytest.approx(reported["grad_norm"])
    clipped = float(grad_norm.item() > clip)
    assert (values["clipped"], values["clip_frac"]) == (clipped, clipped)
    assert "cuda_gb_allocated" not in values  # a CPU run measures no GPU memory


def test_divergence_exits_42_after_flushing_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_trainer(run_dir, "--max-steps", "30", "--fault", "diverge:step=3,factor=100000")
    assert result.returncode == 42, explain(result)
    last = metrics(run_dir)[-1]
    assert not math.isfinite(last["loss"]) and last["step"] < 30
    assert "diverged: non-finite loss" in (run_dir / "trainer.log").read_text()


def test_a_hung_rank_leaves_a_stale_heartbeat_step_that_keeps_arriving(tmp_path: Path, receiver: Any) -> None:
    """The loop records the beat, a thread only sends it: a hung loop's beat keeps its old time and step
    while it keeps arriving (the control plane tells a hung rank from an unreachable one)."""
    run_dir = tmp_path / "run"
    env = {
        "TRAINOPS_API_URL": f"http://127.0.0.1:{receiver.server_port}",
        "TRAINOPS_TOKEN": "tok-1",
        "TRAINOPS_RUN_ID": "7",
    }
    proc = start_trainer(
        run_dir, *FP32, "--max-steps", "50", "--fault", "hang:step=3,rank=1", "--pg-timeout-s", "120", env=env
    )

    def rank1() -> list[dict[str, Any]]:
        return [b for b in beats_posted(receiver, "/api/v1/runs/7/heartbeats") if b["rank"] == 1]

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(b["step"] == 2 for b in rank1()):
            time.sleep(0.2)
        time.sleep(7)  # three more sends of every rank's newest beat
        assert proc.poll() is None  # still running, not crashed
        stuck = [b for b in rank1() if b["step"] == 2]
        assert len(stuck) >= 3 and len({b["time"] for b in stuck}) == 1, stuck
        assert time.time() - stuck[-1]["time"] > 5 and max(b["step"] for b in rank1()) == 2
    finally:
        # torchrun stops its workers on SIGTERM; they run in their own sessions, so also kill them by pid.
        proc.terminate()
        proc.wait(timeout=60)
        for pid in {b["pid"] for b in beats_posted(receiver, "/api/v1/runs/7/heartbeats")}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_fp16_signals_and_a_clipped_step_match_a_reference_at_four_ranks(tmp_path: Path) -> None:
    """OPT's format at 4 ranks, where FairScale's pre- and post-divide are both 2: the gradient is reduced in
    fp16 as 2 x 2 and unscaled by N / (loss scale x global tokens) inside the optimizer step. Against the
    same step computed in fp32 in one process from the same fp16 weights: the reported signals agree to
    fp16's precision, and the clipped (clip 0.01) Adam update applied to the fp16 weights is the reference's
    (Adam's eps raised to 1e-5, near the clipped gradient's elements, so the update depends on the
    gradient's size, not only its sign: an unscale or clip off by any factor moves it)."""
    run_dir = tmp_path / "run"
    clip, lr, eps = 0.01, 1e-2, 1e-5
    flags = [
        *("--precision", "fp16", "--global-batch-tokens", "1024", "--max-steps", "1", "--dropout", "0"),
        *("--seed", "5", "--clip", str(clip), "--lr", str(lr), "--warmup-steps", "1", "--adam-eps", str(eps)),
        *("--checkpoint-mode", "sync"),
    ]
    result = run_trainer(run_dir, *flags, nproc=4)
    assert result.returncode == 0, explain(result)
    log = (run_dir / "trainer.log").read_text()
    assert "fp16 reduction divided by 2 before and 2 after" in log  # both factors non-trivial
    assert "fsdp: parameters stored in float16, gradients reduce-scattered in float16" in log
    reported = metrics(run_dir)[0]
    values = reported["values"]
    assert reported["loss_scale"] == 4.0 and reported["lr"] == lr

    # the reference: the trainer's fp16 initial weights in fp32, all four ranks' micro-batches at once
    tokens = np.load(next((run_dir / "cache").glob("tokens-*.npy")))
    stream = TokenStream(tokens, seq_len=128, seed=5)
    batches = [
        stream.batch(step_index=0, micro_index=0, rank=r, world=4, micro_batch=2, accum_steps=1)
        for r in range(4)
    ]
    model = build_model(preset_model_config("tiny", dropout=0.0), device="cpu")
    init_weights(model, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    param_norm = torch.sqrt(sum(p.double().square().sum() for p in start.values()))
    logits = model(torch.cat([b.inputs for b in batches]))
    loss = F.cross_entropy(logits.flatten(0, 1), torch.cat([b.targets for b in batches]).flatten())
    loss.backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
    grad_norm = torch.sqrt(sum(g.square().sum() for g in grads.values())).item()

    # fp16 tolerances (an fp16 forward, backward and reduction against fp32; measured on CPU: loss 1e-7,
    # norms 1.2e-4, maxima 7e-4 relative, zero shares 3e-4, the update 0.4%): a factor of 2 anywhere fails
    assert reported["loss"] == pytest.approx(loss.item(), rel=1e-3)
    assert values["loss_bits"] == pytest.approx(loss.item() / math.log(2), rel=1e-3)
    assert reported["grad_norm"] == pytest.approx(grad_norm, rel=2e-3)
    # the parameters are exact fp16 values: their norm, accumulated in fp32, is the reference's
    assert values["param_norm"] == pytest.approx(param_norm.item(), rel=1e-6)
    groups = {"embed": ("embed_",), "lower": ("layers.0.",), "upper": ("layers.1.",), "head": ("final_",)}
    tiny = (
        2 * torch.finfo(torch.float16).tiny
    )  # metaseq's near-zero: 2 x the gradient dtype's smallest normal
    for group, prefixes in groups.items():
        flat = torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefixes)])
        near_zero = (flat.abs() < tiny).double().mean().item()
        assert values[f"gnorm_{group}"] == pytest.approx(flat.norm().item(), rel=2e-3), group
        assert values[f"gmax_{group}"] == pytest.approx(flat.max().item(), rel=5e-3), group
        # of the unscaled gradient: the scaled fp16 one (x 1024 here) would count far fewer
        assert values[f"gzero_{group}"] == pytest.approx(near_zero, abs=3e-3), group
    assert values["clipped"] == 1.0 and grad_norm > 10 * clip

    # the update: metaseq's Adam, first step, on the gradient scaled by clip / grad_norm, rounded to fp16
    after = model_weights(run_dir / "checkpoints" / "step_00000001", tmp_path)
    assert {w.dtype for w in after.values()} == {torch.float16}
    deltas, expected = [], []
    for name, p0 in start.items():
        g = grads[name].float() * (clip / (grad_norm + 1e-6))  # metaseq: max_norm / (norm + 1e-6)
        m, v = 0.1 * g, 0.05 * g * g
        ref = p0 - lr * 0.1 * p0  # weight decay on every parameter (fidelity mode)
        ref = ref - lr * math.sqrt(0.05) / 0.1 * m / (v.sqrt() + eps)
        deltas.append((after[name].float() - p0).flatten())
        expected.append((ref.half().float() - p0).flatten())
    delta, want = torch.cat(deltas).double(), torch.cat(expected).double()
    assert ((delta - want).norm() / want.norm()).item() < 0.02  # without the clip: 5.1
