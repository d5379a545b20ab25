"""Embedded OPT trainer: FSDP2, dynamic loss scaling, activation-norm telemetry, atomic checkpoints, exact
resume.

Launch (see docs/trainer.md):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29500 -m trainer.train --preset tiny --max-steps 40 --run-dir runs/demo

Exit codes (docs/reporting-contract.md): 0 reached max_steps, 2 bad configuration, 42 diverged (non-finite
loss
on some rank; metrics flushed first), 43 the fp16 loss scale reached its floor (OPT's stop; metrics flushed
first), anything else is a crash.
"""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, fully_shard

from trainer.checkpoint import (
    Checkpointer,
    CheckpointInfo,
    catalog_record,
    checkpoint_precision,
    read_meta,
)
from trainer.config import ConfigError, TrainConfig, parse_args
from trainer.contract import (
    EXIT_CHECKPOINT_CORRUPT,
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_LOSS_SCALE_FLOOR,
    EXIT_OK,
    LOSS_SCALE_FLOOR_VALUE,
    cache_dir,
    checkpoints_dir,
    faults_dir,
    json_safe_point,
    metrics_dir,
    overrides_path,
    spool_dir,
    summary_path,
    trainer_log_path,
)
from trainer.data import TokenStream, prepare_tokens
from trainer.faults import FaultInjector, faults_from_env
from trainer.model import PRESETS, OPTModel, build_model, flops_per_token, init_weights, preset_model_config
from trainer.precision import (
    DynamicLossScaler,
    FP16ParamAdam,
    fsdp_formats,
    mixed_precision_policy,
    opt_predivide_factors,
    stores_fp16_params,
)
from trainer.reporting import (
    NullHeartbeatSender,
    NullReporter,
    host_for_rank,
    make_heartbeat_sender,
    make_reporter,
)
from trainer.schedule import LRSchedule
from trainer.telemetry import (
    ActivationProbes,
    ClipCounter,
    CudaMemory,
    GradientStats,
    Heartbeat,
    MetricsFile,
    NullActivationProbes,
    NullCudaMemory,
    NullHeartbeat,
    NullMetricsFile,
    NullStragglerProbe,
    Section,
    StragglerProbe,
    device_peak_tflops,
    reduce_step_stats,
)

WINDOW = 50  # recent loss / act-norm values kept in checkpoint metadata


class RunLog:
    """`trainer.log`, shared by all ranks (O_APPEND line writes); rank 0 also prints."""

    def __init__(self, path: Path, rank: int) -> None:
        self.rank = rank
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank{self.rank} {message}\n"
        os.write(self.fd, line.encode())
        if self.rank == 0:
            print(line, end="", flush=True)


def init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """torchrun env (or a single local process when launched without it); explicit PG timeout."""
    if "RANK" not in os.environ:  # plain `python -m trainer.train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.pg_timeout_s)
    )
    return dist.get_rank(), dist.get_world_size(), device


def shard_model(model: OPTModel, precision: str, world: int, predivide: bool, device: torch.device) -> float:
    """FSDP2 per block, then the root (embeddings, final LN); returns the loss pre-divide factor.

    OPT's gradient pre-divide: instead of averaging by N after the reduction, divide by ~sqrt(N) before and
    after. fp16 (OPT's format): the parameters are fp16 and FSDP2 reduce-scatters the fp16 gradients dividing
    by FairScale's factors itself (`opt_predivide_factors`), so the loss is not touched. Other formats
    reduce in fp32: sqrt(N) is folded into the loss multiplier before and FSDP's divide factor (with a plain
    sum reduction) after.
    """
    if stores_fp16_params(precision):
        model.to(dtype=torch.float16)  # still on the meta device: only the dtype changes
    policy = mixed_precision_policy(precision)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if predivide and world > 1 and not stores_fp16_params(precision):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(math.sqrt(world))
                module.set_force_sum_reduction_for_comms(True)
        return 1.0 / math.sqrt(world)
    return 1.0


def build_optimizer(model: OPTModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas, eps and decoupled weight decay (`apply_optimizer_config`); fp16:
    metaseq's Adam over fp16 parameters with fp32 moments (`FP16ParamAdam`).

    Two parameter groups, whatever the setting: the 2-D parameters (every weight matrix, both embedding
    tables) and the rest (biases, LayerNorm gains). metaseq decays every parameter (one group over
    `model.parameters()`: metaseq/trainer.py `Trainer._build_optimizer`; its Adam applies `p -= lr * wd * p`
    to each, metaseq/optim/adam.py), which `weight_decay_all_params` gives by decaying the second group too;
    keeping the groups fixed keeps the checkpoint layout the same either way, so a run can resume across a
    change of the setting.
    """
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices}, {"params": vectors}]
    optimizer: torch.optim.Optimizer
    if stores_fp16_params(cfg.precision):
        optimizer = FP16ParamAdam(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=0.0)
    apply_optimizer_config(optimizer, cfg)
    return optimizer


def apply_optimizer_config(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set each group's betas, eps and weight decay from the configuration; also after loading a checkpoint,
    whose saved param groups would otherwise bring back the values it was trained with. (metaseq keeps the
    checkpoint's unless `--optimizer-overrides` names them: `BaseOptimizer.load_state_dict`; here the
    configuration is the recipe, and only LR, LR scale and clip are inherited from checkpoints.)"""
    matrices, vectors = optimizer.param_groups
    for group in (matrices, vectors):
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.adam_eps
    matrices["weight_decay"] = cfg.weight_decay
    vectors["weight_decay"] = cfg.weight_decay if cfg.weight_decay_all_params else 0.0


def local_grads(model: OPTModel) -> list[torch.Tensor]:
    return [
        p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        for p in model.parameters()
        if p.grad is not None
    ]


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resolve_batch(cfg: TrainConfig, seq_len: int, world: int) -> tuple[int, int]:
    """(global batch tokens, gradient-accumulation steps)."""
    batch_tokens = cfg.global_batch_tokens or PRESETS[cfg.preset].batch_tokens
    per_micro = seq_len * cfg.micro_batch_size * world
    if batch_tokens % per_micro:
        raise ConfigError(
            f"global batch of {batch_tokens} tokens is not a multiple of seq_len x micro_batch_size"
            f" x world = {seq_len} x {cfg.micro_batch_size} x {world}"
        )
    return batch_tokens, batch_tokens // per_micro


def validate(
    model: OPTModel, stream: TokenStream, cfg: TrainConfig, rank: int, world: int, device: torch.device
) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in stream.val_batches(
            n_batches=cfg.val_batches, rank=rank, world=world, micro_batch=cfg.micro_batch_size
        ):
            logits = model(batch.inputs.to(device))
            total += F.cross_entropy(logits.float().flatten(0, 1), batch.targets.to(device).flatten())
    dist.all_reduce(total)
    model.train()
    return total.item() / (cfg.val_batches * world)


def train(cfg: TrainConfig) -> int:
    rank, world, device = init_distributed(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(trainer_log_path(run_dir), rank)
    attempt = int(os.environ.get("TRAINOPS_ATTEMPT", "1"))
    host = host_for_rank(rank, world)
    log(
        f"start attempt={attempt} world={world} device={device} host={host} pid={os.getpid()} "
        f"config={cfg.to_json()}"
    )

    # ---- data: tokenizer + token array built once on rank 0, read by all ----
    preset = PRESETS[cfg.preset]
    seq_len = cfg.seq_len or preset.model.max_seq_len
    batch_tokens, accum = resolve_batch(cfg, seq_len, world)
    if rank == 0:
        prepare_tokens(
            corpus=cfg.corpus,
            cache_dir=cache_dir(run_dir),
            vocab_size=cfg.bpe_vocab_size or preset.model.vocab_size,
            tokenizer_dir=cfg.tokenizer_dir,
        )
    dist.barrier()
    _, ids_path = prepare_tokens(
        corpus=cfg.corpus,
        cache_dir=cache_dir(run_dir),
        vocab_size=cfg.bpe_vocab_size or preset.model.vocab_size,
        tokenizer_dir=cfg.tokenizer_dir,
    )
    tokens = np.load(ids_path)
    stream = TokenStream(tokens, seq_len=seq_len, seed=cfg.seed)
    # The token array's cache key: format, tokenizer (trained or the user's files) and documents. A checkpoint
    # records it; resuming on other data would silently train on other token ids at the same data position.
    data_key = ids_path.stem.removeprefix("tokens-")

    # ---- model: meta -> FSDP2 shards -> materialise -> seeded init (identical at any world size) ----
    model_cfg = preset_model_config(
        cfg.preset, max_seq_len=seq_len, dropout=preset.model.dropout if cfg.dropout is None else cfg.dropout
    )
    if int(tokens.max()) >= model_cfg.vocab_size:
        raise ConfigError(
            f"tokenizer ids reach {int(tokens.max())} but the model's vocab is {model_cfg.vocab_size}"
        )
    model = build_model(model_cfg)
    loss_multiplier = shard_model(model, cfg.precision, world, cfg.grad_predivide, device)
    model.to_empty(device=device)
    init_weights(model, cfg.seed)
    model.train()
    optimizer = build_optimizer(model, cfg)
    torch.manual_seed(cfg.seed * 1000 + rank + 1)  # dropout stream, distinct per rank
    log(
        f"model {cfg.preset}: {model.num_params():,} parameters, seq_len={seq_len}, "
        f"batch={batch_tokens} tokens "
        f"(micro {cfg.micro_batch_size} x accum {accum} x world {world}), precision={cfg.precision}"
    )

    # ---- components (disabled ones are do-nothing objects) ----
    faults = FaultInjector(cfg.fault, rank=rank, host=host, state_dir=faults_dir(run_dir), log=log)
    scaler = DynamicLossScaler.resolve(
        cfg.precision,
        initial=cfg.initial_loss_scale,
        window=cfg.loss_scale_window,
        floor=cfg.min_loss_scale,
        data_parallel=world,
        update_freq=accum,
    )
    initial_scale = scaler.scale
    fp16_params = stores_fp16_params(cfg.precision)
    if fp16_params:
        pre, post = opt_predivide_factors(world)
        log(f"fp16 (OPT): fp16 parameters, fp16 reduction divided by {pre:g} before and {post:g} after")
    log(scaler.describe())
    warmup = (
        cfg.warmup_steps
        if cfg.warmup_steps is not None
        else (preset.warmup_steps or math.ceil((preset.warmup_tokens or 0) / batch_tokens))
    )
    schedule = LRSchedule(
        peak_lr=cfg.lr or preset.peak_lr,
        warmup_steps=warmup,
        total_steps=math.ceil((cfg.total_tokens or preset.total_tokens) / batch_tokens),
        min_ratio=cfg.min_lr_ratio,
        scale=cfg.lr_scale or 1.0,
    )
    clip = cfg.clip or 1.0
    reporter = (
        make_reporter(rank=rank, spool_dir=spool_dir(run_dir), interval_s=cfg.report_interval_s, log=log)
        if cfg.telemetry
        else NullReporter()
    )
    # Every rank's beat goes to the control plane (the orchestrator's one source for hangs and stragglers).
    beat_sender = make_heartbeat_sender(log=log) if cfg.telemetry else NullHeartbeatSender()
    heartbeat = Heartbeat(beat_sender, rank=rank, host=host) if cfg.telemetry else NullHeartbeat()
    metrics = MetricsFile(metrics_dir(run_dir), rank=rank) if cfg.telemetry else NullMetricsFile()
    act_probes = ActivationProbes(model, device) if cfg.telemetry else NullActivationProbes(device)
    grad_stats = GradientStats(model, n_layers=model_cfg.n_layers, detailed=cfg.telemetry)
    gpu_memory = CudaMemory(device) if cfg.telemetry and device.type == "cuda" else NullCudaMemory()
    clip_counter = ClipCounter()
    probe = (
        StragglerProbe(world=world, device=device) if cfg.telemetry and world > 1 else NullStragglerProbe()
    )

    def on_commit(info: CheckpointInfo, checksum: str) -> None:
        # the same record the orchestrator builds when it finds the checkpoint on disk
        reporter.checkpoint(catalog_record(info.path, info.step, info.meta, checksum))

    checkpointer = Checkpointer(
        checkpoints_dir(run_dir),
        rank=rank,
        mode=cfg.checkpoint_mode,
        keep=cfg.keep_checkpoints,
        on_commit=on_commit,
        before_marker=faults.in_checkpoint_commit,
        log=log,
    )

    # ---- resume and overrides ----
    step, tokens_seen, data_position = 0, 0, 0
    loss_window: collections.deque[float] = collections.deque(maxlen=WINDOW)
    act_window: collections.deque[float] = collections.deque(maxlen=WINDOW)
    overrides: dict[str, float] = {}
    if cfg.resume_from:
        # The ranks verify the checkpoint together, each re-hashing its 1/world share: every rank reading
        # all of a 2.5 TB checkpoint would read it world-size times over before the first step.
        ckpt = checkpointer.latest_loadable() if cfg.resume_from == "latest" else Path(cfg.resume_from)
        if isinstance(ckpt, Path):
            ok, reason = checkpointer.verify(ckpt)
            if not ok:
                # Every rank has the same verdict (verify gathers them all). Leave together, process group
                # torn down: a rank that exited with it alive made its peer's gloo threads abort (SIGABRT,
                # exit 134, read as a signal instead of the corrupt checkpoint).
                dist.barrier()
                dist.destroy_process_group()
                raise CheckpointUnloadable(f"checkpoint {ckpt} is not loadable: {reason}")
        ckpt_path = ckpt.path if isinstance(ckpt, CheckpointInfo) else ckpt
        if ckpt_path is None:
            log("resume_from=latest: no committed checkpoint yet, starting fresh")
        else:
            saved_meta = read_meta(ckpt_path)
            trained_on = saved_meta.get("data_key")
            if trained_on is not None and trained_on != data_key:
                dist.barrier()  # every rank reads the same meta and key: leave together (see above)
                dist.destroy_process_group()
                raise ConfigError(
                    f"checkpoint {ckpt_path} was trained on data {trained_on} and this run's corpus, "
                    f"tokenizer and tokenization give {data_key}: resuming would train on other token ids "
                    "at the same data position. Resume with the corpus and tokenizer it was trained with, "
                    "or start a new run"
                )
            written_in = checkpoint_precision(ckpt_path, saved_meta)
            if written_in is not None and written_in != cfg.precision and not cfg.allow_precision_change:
                dist.barrier()  # the same verdict on every rank (same files): leave together
                dist.destroy_process_group()
                raise ConfigError(
                    f"checkpoint {ckpt_path} was written in precision {written_in} and this run is "
                    f"configured for {cfg.precision}: resuming would convert its weights and keep its "
                    f"loss-scaler state (scale {saved_meta.get('loss_scale')}). Resume with --precision "
                    f"{written_in}, or pass --allow-precision-change to convert it (docs/trainer.md)"
                )
            meta, rng = checkpointer.load(ckpt_path, model, optimizer)
            apply_optimizer_config(optimizer, cfg)
            step, tokens_seen, data_position = meta["step"], meta["tokens"], meta["data_position"]
            loss_window.extend(meta["loss_window"])
            act_window.extend(meta["act_norm_window"])
            scaler.load_state_dict(meta["scaler"])
            schedule.peak_lr, schedule.scale = meta["schedule"]["peak_lr"], meta["schedule"]["scale"]
            clip = meta["clip"]
            if rng is not None:
                set_rng_state(rng, device)
            else:
                log(
                    f"no RNG state for rank {rank} in {ckpt_path} (world size changed); "
                    "dropout stream reseeded"
                )
            overrides["resumed_from_step"] = step
            log(f"resumed from {ckpt_path} at step {step}, {tokens_seen} tokens")
    if cfg.lr is not None:
        schedule.peak_lr = overrides["lr"] = cfg.lr
    if cfg.lr_scale is not None:
        schedule.scale = overrides["lr_scale"] = cfg.lr_scale
    if cfg.clip is not None:
        clip = overrides["clip"] = cfg.clip
    if cfg.reset_loss_scale:
        scaler.reset(initial_scale)
        overrides["reset_loss_scale"] = 1.0
    if cfg.skip_batches:
        data_position += cfg.skip_batches
        overrides["skip_batches"] = cfg.skip_batches
    for key, value in overrides.items():
        log(f"override applied: {key}={value}")
    if rank == 0 and overrides:
        with overrides_path(run_dir).open("a") as f:
            f.write(json.dumps({"attempt": attempt, "step": step, "time": time.time(), **overrides}) + "\n")

    flops_token = flops_per_token(model_cfg, seq_len)
    peak_tflops = cfg.peak_tflops or device_peak_tflops(device)
    step_times: list[float] = []
    first_step = step + 1
    heartbeat.beat(step, section=Section.STARTUP)  # loaded; start-up lasts until the first step is done

    # ---- the loop ----
    while step < cfg.max_steps:
        step += 1
        faults.at_step_start(step)
        t0 = time.perf_counter()
        probe.arrive(step)  # waiting here for a late rank stays in this step's time: it costs throughput
        lr = schedule.lr_at(step) * faults.lr_factor(step, lr_scale=schedule.scale)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        scale = scaler.scale
        for micro in range(accum):
            batch = stream.batch(
                step_index=data_position,
                micro_index=micro,
                rank=rank,
                world=world,
                micro_batch=cfg.micro_batch_size,
                accum_steps=accum,
            )
            logits = model(batch.inputs.to(device, non_blocking=True))
            targets = batch.targets.to(device).flatten()
            if fp16_params:
                # metaseq: backward of scale x the sum over tokens; the division by the token count is in
                # `grad_unscale`, applied in fp32 inside the optimizer step
                loss_tokens = F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="sum")
                (loss_tokens * scale).backward()
                loss = loss_tokens.detach() / targets.numel()
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets)
                (loss * (scale * loss_multiplier / accum)).backward()
            loss_sum += loss.detach()
        faults.after_backward(step, model)
        if step == first_step:  # FSDP2 resolves its formats lazily, at the first forward
            log(fsdp_formats(model))

        # One all_reduce for loss, activation, gradient and parameter statistics (and one of maxima when
        # telemetry measures them), of the unscaled gradient. fp16: the gradients stay scaled (unscaling in
        # fp16 would underflow) and their statistics are taken in fp32 times `grad_unscale`; FSDP2 divided
        # the sum over ranks by N, so x N / (scale x global tokens) = the mean's gradient.
        grads = local_grads(model)
        grad_unscale = world / (scale * batch_tokens) if fp16_params else 1.0 / scale
        if not fp16_params:
            torch._foreach_mul_(grads, grad_unscale)
        measured_unscale = grad_unscale if fp16_params else 1.0
        stats = reduce_step_stats(
            loss_sum / accum,
            act_probes.take(),
            grad_stats.local_sums(unscale=measured_unscale),
            world,
            maxima=grad_stats.local_maxima(unscale=measured_unscale) if cfg.telemetry else None,
            memory=gpu_memory.take(),
            group_numel=grad_stats.group_numel,
        )
        loss_value, act_norm, grad_norm = stats.loss, stats.act_norm, stats.grad_norm

        overflow = not math.isfinite(grad_norm)
        if overflow or not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
        elif isinstance(optimizer, FP16ParamAdam):
            # metaseq's clip: the clip coefficient (its max_norm / (norm + 1e-6), at most 1) joins the unscale
            # factor, applied to the fp32 gradient
            clip_factor = min(1.0, clip / (grad_norm + 1e-6))
            optimizer.step(grad_multiplier=grad_unscale * clip_factor)
            optimizer.zero_grad(set_to_none=True)
        else:
            clip_coef = clip / (grad_norm + 1e-6)
            if clip_coef < 1.0:
                torch._foreach_mul_(grads, clip_coef)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scaler.update(overflow=overflow)
        tokens_seen += batch_tokens
        data_position += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        step_times.append(step_time)

        tokens_per_s = batch_tokens / step_time
        tflops = flops_token * tokens_per_s / world / 1e12
        values: dict[str, float | None] = {"overflow": float(overflow), "grad_accum": float(accum)}
        if scaler.floor_reached:
            values[LOSS_SCALE_FLOOR_VALUE] = 1.0
        if cfg.telemetry:
            values.update(stats.values())
            values.update(clip_counter.observe(grad_norm, clip))
        if peak_tflops:
            values["mfu"] = tflops / peak_tflops
        # metaseq validates every --validate-interval-updates and when training stops (cli/train.py)
        if cfg.val_interval and (step % cfg.val_interval == 0 or step == cfg.max_steps):
            heartbeat.beat(step, section=Section.VALIDATION)
            val_loss = validate(model, stream, cfg, rank, world, device)
            values.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        if step == first_step and overrides:
            values.update({f"override_{k}": float(v) for k, v in overrides.items()})
        point = {
            "step": step,
            "time": time.time(),
            "tokens": tokens_seen,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "loss_scale": scaler.scale,
            "act_norm": act_norm,
            "lr": lr,
            "clip": clip,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops,
            "step_time_s": step_time,
            "actv_norm": stats.actv_norm,
            "values": values,
        }
        metrics.write({**point, "attempt": attempt, "rank": rank})
        reporter.metric(json_safe_point(point))
        timing = {"step_time_s": probe.mean_busy_s(), "last_step_s": step_time, "busy": probe.recent()}
        heartbeat.beat(step, **timing)

        # divergence guards: the same verdict on every rank (reduced loss, reduced gradient norm)
        stop_code = None
        if not math.isfinite(loss_value):
            stop_code = EXIT_DIVERGED
            log(
                f"diverged: non-finite loss {loss_value} at step {step}; flushing metrics and exiting "
                f"{EXIT_DIVERGED}"
            )
        elif scaler.floor_reached:
            stop_code = EXIT_LOSS_SCALE_FLOOR
            log(
                f"loss scale floor: an overflow at step {step} would take the loss scale {scaler.scale:g} to "
                f"{scaler.scale / 2:g} <= --min-loss-scale {scaler.floor:g} ({scaler.overflows} overflows "
                f"so far); stopping as metaseq did; flushing metrics and exiting {EXIT_LOSS_SCALE_FLOOR}"
            )
        if stop_code is not None:
            checkpointer.close()
            metrics.close()
            reporter.close()
            beat_sender.close()
            dist.destroy_process_group()
            return stop_code

        loss_window.append(loss_value)
        if act_norm is not None:
            act_window.append(act_norm)
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps:
            meta = {
                "step": step,
                "tokens": tokens_seen,
                "data_position": data_position,
                "attempt": attempt,
                "time": time.time(),
                "loss": loss_value,
                "act_norm": act_norm,
                "loss_scale": scaler.scale,
                "lr": lr,
                "clip": clip,
                "loss_window": list(loss_window),
                "act_norm_window": list(act_window),
                "scaler": scaler.state_dict(),
                "schedule": schedule.state_dict(),
                "world_size": world,
                "preset": cfg.preset,
                "precision": cfg.precision,
                "data_key": data_key,
                "seq_len": seq_len,
                "batch_tokens": batch_tokens,
            }
            heartbeat.beat(step, section=Section.CHECKPOINT_SAVE, **timing)
            stall = checkpointer.save(step, model, optimizer, meta, rng_state(device))
            heartbeat.beat(step, **timing)
            log(f"checkpoint of step {step} started ({cfg.checkpoint_mode}); loop blocked {stall:.3f}s")

    checkpointer.close()
    metrics.close()
    reporter.close()
    beat_sender.close()
    if rank == 0:
        steady = step_times[2:] or step_times
        median = statistics.median(steady) if steady else float("nan")
        summary = {
            "steps": len(step_times),
            "final_step": step,
            "median_step_time_s": median,
            "tokens_per_s": batch_tokens / median if steady else None,
            "tflops_per_device": flops_token * batch_tokens / median / world / 1e12 if steady else None,
            "peak_tflops": peak_tflops,
            "world_size": world,
            "batch_tokens": batch_tokens,
        }
        summary_path(run_dir).write_text(json.dumps(summary, indent=1))
        log(f"done at step {step}: {json.dumps(summary)}")
    dist.destroy_process_group()
    return EXIT_OK


class CheckpointUnloadable(Exception):
    """The checkpoint named by --resume-from failed the ranks' verification: exit EXIT_CHECKPOINT_CORRUPT,
    so the orchestrator marks it corrupt and restarts from another (a bad configuration would be final)."""


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        if env_faults := faults_from_env():
            cfg = TrainConfig(**{**cfg.__dict__, "fault": [*cfg.fault, *env_faults]})
        return train(cfg)
    except ConfigError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointUnloadable as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_CORRUPT


if __name__ == "__main__":
    sys.exit(main())
