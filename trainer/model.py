"""OPT decoder-only transformer (Zhang et al., 2022), the whole model in one file.

Pre-LayerNorm blocks, learned positional embeddings, ReLU feed-forward of 4 x d_model, input and output
embeddings tied, dropout 0.1 everywhere except on the embeddings. Initialisation follows OPT/Megatron:
normal(0, 0.006) for every weight, the two output projections of each block (attention out_proj and fc2)
scaled by 1/sqrt(2L), every bias 0, LayerNorm gains 1.

Learned positions are laid out as OPT's (metaseq's `LearnedPositionalEmbedding` with padding index 1, Hugging
Face's `OPTLearnedPositionalEmbedding` with `offset = 2`): the table has max_seq_len + 2 rows and position p
reads row p + 2, so published OPT weights (2050 rows for 2048 tokens) load as they are (`trainer.hf_opt`).
Row 1 is the padding row, zero and never read (trainops does not pad); row 0 is never read either.

`init_weights` draws every parameter's *full* tensor from one seeded generator in a fixed order and copies the
local shard, so a sharded model (FSDP2 DTensors) starts bitwise identical to an unsharded one, at any world
size, holding at most one full parameter in memory at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

OPT_VOCAB_SIZE = 50272  # GPT-2's 50257 BPE tokens + OPT's specials, padded to a multiple of 8
POSITION_OFFSET = 2  # position p of a sequence reads row p + 2 of the position table (OPT's layout)
POSITION_PAD_ROW = 1  # OPT's padding index: its row of the position table is zero


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of one OPT model."""

    n_layers: int
    n_heads: int
    d_model: int
    vocab_size: int = OPT_VOCAB_SIZE
    max_seq_len: int = 2048
    dropout: float = 0.1
    init_std: float = 0.006

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.n_layers, self.n_heads, self.d_model, self.vocab_size, self.max_seq_len) <= 0:
            raise ValueError("model dimensions must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A row of the OPT paper's Table 1 (or a CPU-sized toy) plus its schedule."""

    model: ModelConfig
    peak_lr: float
    batch_tokens: int
    warmup_steps: int | None = None  # OPT-175B warmed up over 2000 steps ...
    warmup_tokens: int | None = None  # ... the smaller models over 375M tokens
    total_tokens: int = 300_000_000_000  # LR decays to 10% of peak over this budget


def _opt(n_layers: int, n_heads: int, d_model: int, lr: float, batch_tokens: int, **kw: int) -> Preset:
    warmup = kw or {"warmup_tokens": 375_000_000}
    return Preset(
        model=ModelConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model),
        peak_lr=lr,
        batch_tokens=batch_tokens,
        **warmup,
    )


M = 2**20  # OPT's "0.5M tokens" is 256 sequences of 2048 = 2**19 tokens
PRESETS: dict[str, Preset] = {
    # Toys that train on two CPU cores in seconds; their vocab is the locally trained BPE's.
    "tiny": Preset(
        model=ModelConfig(n_layers=2, n_heads=4, d_model=64, vocab_size=2048, max_seq_len=128),
        peak_lr=3e-3,
        batch_tokens=2 * 4 * 128,
        warmup_steps=5,
        total_tokens=400 * 1024,
    ),
    "small": Preset(
        model=ModelConfig(n_layers=4, n_heads=4, d_model=128, vocab_size=4096, max_seq_len=256),
        peak_lr=2e-3,
        batch_tokens=2 * 8 * 256,
        warmup_steps=20,
        total_tokens=2000 * 4096,
    ),
    "125M": _opt(12, 12, 768, 6.0e-4, M // 2),
    "350M": _opt(24, 16, 1024, 3.0e-4, M // 2),
    "1.3B": _opt(24, 32, 2048, 2.0e-4, 1 * M),
    "2.7B": _opt(32, 32, 2560, 1.6e-4, 1 * M),
    "6.7B": _opt(32, 32, 4096, 1.2e-4, 2 * M),
    "13B": _opt(40, 40, 5120, 1.0e-4, 4 * M),
    "30B": _opt(48, 56, 7168, 1.0e-4, 4 * M),
    "66B": _opt(64, 72, 9216, 0.8e-4, 2 * M),
    "175B": _opt(96, 96, 12288, 1.2e-4, 2 * M, warmup_steps=2000),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    """Pre-LN transformer block: x + drop(attn(ln(x))), then x + drop(fc2(relu(fc1(ln(x)))))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.fc2(F.relu(self.fc1(self.ln_ffn(x)))))


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(
            cfg.max_seq_len + POSITION_OFFSET, cfg.d_model, padding_idx=POSITION_PAD_ROW
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    @property
    def final_block(self) -> Block:
        """The block whose output activations OPT tracked (L2 norm) as a divergence signal."""
        return self.layers[-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, seq, vocab). No dropout on the embeddings (OPT)."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        positions = torch.arange(POSITION_OFFSET, POSITION_OFFSET + tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        return F.linear(x, self.embed_tokens.weight)  # tied output projection

    def num_params(self, *, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_positions.weight.numel() if exclude_positions else n


def _initial_value(name: str, shape: torch.Size, cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "ln_" in name or "layer_norm" in name:
        return torch.ones(shape)
    std = cfg.init_std
    if name == "embed_positions.weight":
        # Only the rows positions read are drawn (as many values as a table without the offset had, so the
        # generator's stream and every later parameter are unchanged); the pad row and row 0 stay zero.
        table = torch.zeros(shape)
        table[POSITION_OFFSET:].normal_(0.0, std, generator=gen)
        return table
    if name.endswith(("out_proj.weight", "fc2.weight")):
        std /= math.sqrt(2 * cfg.n_layers)  # residual-branch outputs, Megatron/OPT scaling
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(model: OPTModel, seed: int) -> None:
    """Initialise every parameter in place, identically whether or not it is sharded (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        full = _initial_value(name, param.shape, model.cfg, gen)
        if isinstance(param.data, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def build_model(cfg: ModelConfig, *, device: str | torch.device = "meta") -> OPTModel:
    """Construct without initialising; `meta` allocates nothing (parameter counting, pre-shard)."""
    with torch.device(device):
        return OPTModel(cfg)


def preset_model_config(name: str, **overrides: object) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name].model, **overrides)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), PaLM/Megatron convention.

    6 * N for every weight matmul (N = parameters excluding the positional table; the tied embedding is
    counted once, as the output projection) plus 12 * L * d_model * seq_len for the attention scores and
    weighted sum. Recomputation is not counted, so this is *model* FLOPs (MFU, not HFU).
    """
    n_matmul = (
        cfg.n_layers * (12 * cfg.d_model**2 + 13 * cfg.d_model)
        + cfg.vocab_size * cfg.d_model
        + 2 * cfg.d_model
    )
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len
