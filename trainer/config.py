"""Typed trainer configuration; command-line flags are generated from the dataclass.

Every field has a docstring (shown by `--help`). Precedence: dataclass default < `--config file.json` < flags.
A bad flag or an invariant violation is a `ConfigError`, which `trainer.train` turns into exit code 2 with a
one-line message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.data import TokenizerFilesError, read_user_vocabulary
from trainer.faults import parse_fault
from trainer.model import PRESETS
from trainer.precision import PRECISIONS, default_initial_loss_scale, default_min_loss_scale


class ConfigError(ValueError):
    """Bad configuration or arguments (exit code 2)."""


@dataclass(kw_only=True)
class TrainConfig:
    preset: str = "tiny"
    """Model preset: an OPT Table 1 row (125M ... 175B) or a CPU toy (tiny, small)."""
    run_dir: str = "runs/trainer"
    """Root of this run's files: checkpoints/, heartbeats/, spool/, cache/, trainer.log, metrics.jsonl."""
    max_steps: int = 100
    """Stop after this optimizer step (steps count from 1; a resumed run continues the count)."""
    seq_len: int | None = None
    """Tokens per sequence; unset = the preset's (2048 for OPT presets)."""
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward."""
    global_batch_tokens: int | None = None
    """Tokens per optimizer step over all ranks; unset = the preset's batch. Sets gradient accumulation."""
    precision: Literal["fp16", "fp16-mixed", "bf16", "fp32"] = "fp16"
    """Number format. fp16 = OPT as metaseq trained it: fp16 parameters and gradients, fp16 reduction with
    FairScale's pre/post divide (~sqrt(N) each side), fp32 Adam moments, OPT's loss scaler (stops at its
    floor). fp16-mixed = fp16 compute over fp32 master weights, fp32 reduction, scale 65536 clamped at its
    floor. bf16 = bf16 compute, fp32 master weights. fp32 = no reduced precision (docs/trainer.md)."""
    lr: float | None = None
    """Absolute peak learning rate; unset = the preset's (Table 1)."""
    lr_scale: float | None = None
    """Multiplier on the whole LR schedule; unset = keep the resumed checkpoint's (1.0 on a fresh run)."""
    warmup_steps: int | None = None
    """Linear warm-up steps; unset = the preset's (2000 steps for 175B, 375M tokens for the others)."""
    total_tokens: int | None = None
    """Token budget over which the LR decays linearly to `min_lr_ratio` of peak; unset = the preset's."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of peak (OPT: 10%)."""
    weight_decay: float = 0.1
    """AdamW weight decay (decoupled: each step multiplies a decayed parameter by 1 - lr x weight_decay; OPT
    and metaseq: 0.1). Which parameters it decays: `weight_decay_all_params`."""
    weight_decay_all_params: bool | None = None
    """Decay every parameter, biases and LayerNorm gains included, as metaseq did for OPT (its Trainer hands
    every parameter to one Adam group: metaseq/trainer.py `_build_optimizer`); false = only the 2-D ones
    (every weight matrix and both embedding tables, token and position), not biases or LayerNorm gains.
    Unset = true with precision fp16 (the OPT recipe), false otherwise."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip: float | None = None
    """Gradient-norm clipping threshold; unset = keep the resumed checkpoint's (1.0 on a fresh run)."""
    grad_predivide: bool = True
    """Split the gradient average's division by world size N into two, before and after the reduction
    (fp16: FairScale's power-of-two factor near sqrt(N), always on; fp16-mixed/bf16/fp32: sqrt(N))."""
    initial_loss_scale: float | None = None
    """Dynamic loss scale at the start of a fresh run (fp16 formats only); unset = 4 for fp16 (OPT's
    launcher), 65536 for fp16-mixed."""
    loss_scale_window: int | None = None
    """Double the loss scale after this many consecutive clean steps; unset = for fp16 metaseq's
    max(1, int(2^14 / (data-parallel size x gradient-accumulation steps))), for fp16-mixed 1000."""
    min_loss_scale: float | None = None
    """Floor of the loss scale; unset = 1e-4. fp16: an overflow that would take the scale to or below it
    stops training with exit 43 (EXIT_LOSS_SCALE_FLOOR, a divergence to the orchestrator), as metaseq did;
    fp16-mixed: the scale is clamped there and steps keep being skipped."""
    reset_loss_scale: bool = False
    """On resume, restart the loss scale from the initial scale instead of the checkpoint's value."""
    dropout: float | None = None
    """Dropout probability (attention, residual branches; never embeddings); unset = 0.1."""
    seed: int = 1234
    """Seed of the weight init, data order and dropout streams."""
    resume_from: str | None = None
    """`latest` (newest valid checkpoint, fresh start if none) or a checkpoint directory."""
    allow_precision_change: bool = False
    """Resume a checkpoint written in another `precision` (converting its weights: fp32 master weights cast
    to fp16, or back) instead of refusing it with exit 2. A checkpoint saved as `fp16` with fp32 weights was
    written before fp16 became OPT's format and counts as fp16-mixed (`checkpoint.checkpoint_precision`)."""
    skip_batches: int = 0
    """Advance the data position by this many global batches before training (skip a bad stretch)."""
    checkpoint_interval: int = 100
    """Save every this many steps (0 = only at the end)."""
    checkpoint_mode: Literal["async", "sync"] = "async"
    """async: the loop only waits for a copy to CPU memory; files are written by a background thread."""
    keep_checkpoints: int = 3
    """Keep the newest K committed checkpoints (K >= 2) plus those the control plane pins."""
    val_interval: int = 100
    """Validation loss/perplexity every this many steps and at the last step, as metaseq validates
    (`--validate-interval-updates`, and when training stops); 0 = never. OPT's runs validated every 2000
    updates over whole validation sets (metaseq/launcher/opt_baselines.py); a trainops pass is only
    `val_batches` forward micro-batches per rank, about val_batches / (3 x accumulation steps) of one
    training step, so every 100 steps costs under 1% of the compute and gives a held-out loss at each
    default checkpoint (checkpoint_interval 100), and a short run still gets one at its end."""
    val_batches: int = 2
    """Micro-batches per rank in one validation pass (fixed blocks of the held-out last 5% of tokens)."""
    corpus: str | None = None
    """Text file or directory of *.txt files to train on; unset = the shipped corpus."""
    tokenizer_dir: str | None = None
    """Directory with a GPT-2-format `vocab.json` + `merges.txt` (OPT's own, or GPT-2's: ids shifted by 4
    behind OPT's <s> <pad> </s> <unk>; see trainer/data.py); unset = train a byte-level BPE on the corpus.
    Either way every document ends with </s> (id 2), as in metaseq."""
    bpe_vocab_size: int | None = None
    """Size of the BPE trained on the corpus; unset = the preset's vocab (its embedding table size)."""
    fault: list[str] = field(default_factory=list)
    """Injected fault, repeatable: crash:step=N[,rank=R][,code=C|signal=KILL], hang:step=N[,rank=R],
    inf_grad:step=N[,rank=R], diverge:step=N[,factor=100][,unless_lr_scale_below=X],
    slow:rank=R[,step=N][,delay=0.2], crash_in_checkpoint:step=N[,rank=R],
    host_crash:host=NAME,step=N[,code=C]; `,once` makes a crash or hang fire only the first time the run
    reaches its step (see trainer/faults.py)."""
    telemetry: bool = True
    """Activation-norm hook, heartbeats and control-plane reporting (off only to measure their cost)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; unset = looked up for known GPUs, MFU omitted on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA (NCCL) when available, else CPU (gloo)."""
    threads: int | None = None
    """torch intra-op threads per rank; unset = CPU cores / local ranks."""
    pg_timeout_s: float = 300.0
    """Process-group timeout: a peer lost mid-collective fails the attempt after this long."""
    report_interval_s: float = 1.0
    """How often rank 0's reporter thread sends a batch to the control plane."""

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.preset in PRESETS, f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})"),
            (
                self.precision in PRECISIONS,
                f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})",
            ),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.seq_len is None or self.seq_len >= 2, "seq_len must be >= 2"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (
                self.global_batch_tokens is None or self.global_batch_tokens > 0,
                "global_batch_tokens must be > 0",
            ),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.lr_scale is None or self.lr_scale > 0, "lr_scale must be > 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.total_tokens is None or self.total_tokens > 0, "total_tokens must be > 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (self.clip is None or self.clip > 0, "clip must be > 0"),
            (
                self.initial_loss_scale is None or self.initial_loss_scale > 0,
                "initial_loss_scale must be > 0",
            ),
            (self.min_loss_scale is None or self.min_loss_scale > 0, "min_loss_scale must be > 0"),
            (
                self._initial_loss_scale() >= self._min_loss_scale(),
                f"need initial_loss_scale ({self._initial_loss_scale():g}) >= min_loss_scale "
                f"({self._min_loss_scale():g})",
            ),
            (self.loss_scale_window is None or self.loss_scale_window >= 1, "loss_scale_window must be >= 1"),
            (
                self.grad_predivide or self.precision != "fp16",
                "--precision fp16 reduces gradients in fp16 and always pre-divides them (as OPT did); "
                "use --precision fp16-mixed for --no-grad-predivide",
            ),
            (self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.skip_batches >= 0, "skip_batches must be >= 0"),
            (self.checkpoint_interval >= 0, "checkpoint_interval must be >= 0"),
            (self.keep_checkpoints >= 2, "keep_checkpoints must be >= 2"),
            (self.val_interval >= 0 and self.val_batches >= 1, "val_interval >= 0 and val_batches >= 1"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.pg_timeout_s > 0 and self.report_interval_s > 0, "timeouts must be > 0"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops must be > 0"),
            (self.bpe_vocab_size is None or self.bpe_vocab_size >= 300, "bpe_vocab_size must be >= 300"),
            (self.run_dir.strip() != "", "run_dir must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.weight_decay_all_params is None:
            # metaseq's behaviour is part of the OPT recipe, which precision fp16 selects
            self.weight_decay_all_params = self.precision == "fp16"
        if self.tokenizer_dir is not None:
            try:  # every rank and the launcher refuse bad files before any rank starts working
                read_user_vocabulary(self.tokenizer_dir)
            except TokenizerFilesError as e:
                raise ConfigError(str(e)) from None
        if (
            self.resume_from is not None
            and self.resume_from != "latest"
            and not Path(self.resume_from).is_dir()
        ):
            raise ConfigError(f"resume_from {self.resume_from!r} is neither 'latest' nor a directory")
        for spec in self.fault:
            try:
                parse_fault(spec)
            except ValueError as e:
                raise ConfigError(f"bad --fault {spec!r}: {e}") from None

    def _initial_loss_scale(self) -> float:
        if self.initial_loss_scale is not None:
            return self.initial_loss_scale
        return default_initial_loss_scale(self.precision)

    def _min_loss_scale(self) -> float:
        return (
            self.min_loss_scale if self.min_loss_scale is not None else default_min_loss_scale(self.precision)
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainer.train",
        description="Embedded OPT trainer (launch with torchrun).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON file of field values; flags given on the command line win.")
    hints = typing.get_type_hints(TrainConfig)
    docs = _field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _scalar_type(hints[f.name])
        help_text = docs.get(f.name, "").replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(flag, choices=list(typing.get_args(tp)), help=help_text)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, action="append", dest=f.name, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=tp,
                metavar=tp.__name__.upper(),
                dest=f.name,
                help=help_text + (" (optional)" if optional else ""),
            )
    return parser


def parse_args(argv: list[str]) -> TrainConfig:
    """Flags (and an optional JSON file) -> validated TrainConfig; raises ConfigError on anything wrong."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if config_path := args.pop("config", None):
        try:
            loaded = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --config {config_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_path} must hold a JSON object")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(loaded) - known):
            raise ConfigError(f"unknown keys in --config {config_path}: {', '.join(unknown)}")
        values.update(loaded)
    values.update(args)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
