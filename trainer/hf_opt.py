"""Import and export the Hugging Face OPT layout (`transformers`' `OPTForCausalLM`) for trainops's model.

Works on plain state dicts (name -> tensor) and a config *description* (a `transformers.OPTConfig`, the
`config.json` of a published model read as a dict, or anything with the same attribute names), so neither
this module nor the trainer imports `transformers`; only the parity test (tests/trainer/
test_hf_opt_parity.py) does.

Layout, trainops <-> Hugging Face (prefix `model.decoder.` for `OPTForCausalLM`, `decoder.` for `OPTModel`,
both accepted on import; export writes the `OPTForCausalLM` one):

    embed_tokens.weight            embed_tokens.weight (and lm_head.weight: the output projection is tied)
    embed_positions.weight         embed_positions.weight (max_seq_len + 2 rows; position p reads row p + 2)
    layers.i.ln_attn.*             layers.i.self_attn_layer_norm.*
    layers.i.attn.qkv.*            layers.i.self_attn.{q,k,v}_proj.*  (qkv rows = [q; k; v], heads in order)
    layers.i.attn.out_proj.*       layers.i.self_attn.out_proj.*
    layers.i.ln_ffn.*              layers.i.final_layer_norm.*
    layers.i.fc1.*, fc2.*          layers.i.fc1.*, fc2.*
    final_layer_norm.*             final_layer_norm.*

Only the OPT variant trainops builds converts: pre-LayerNorm blocks, ReLU, a 4 x d_model feed-forward,
biases and LayerNorm gains present, the final LayerNorm kept, tied embeddings, and no `project_in`/
`project_out` (word_embed_proj_dim == hidden_size; true of every OPT size except 350M, which is also
post-LayerNorm). Anything else is a `ValueError` naming the field. Tensors are converted as given (same dtype,
no rounding), so import followed by export gives back the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainer.model import ModelConfig, OPTModel, build_model

CAUSAL_LM_PREFIX = "model.decoder."  # OPTForCausalLM
BASE_MODEL_PREFIX = "decoder."  # OPTModel (how the first published facebook/opt-* weights were saved)
LM_HEAD = "lm_head.weight"

# Per-block parameters whose names differ only in their module path: trainops -> Hugging Face.
_BLOCK_RENAMES = {
    "ln_attn": "self_attn_layer_norm",
    "attn.out_proj": "self_attn.out_proj",
    "ln_ffn": "final_layer_norm",
    "fc1": "fc1",
    "fc2": "fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # the order of the three row blocks of trainops's fused qkv


def _field(description: Mapping[str, Any] | object, name: str, default: Any) -> Any:
    if isinstance(description, Mapping):
        return description.get(name, default)
    return getattr(description, name, default)


def model_config_from_hf(description: Mapping[str, Any] | object) -> ModelConfig:
    """trainops's ModelConfig for an OPT config; ValueError for an OPT variant trainops does not build."""
    hidden = _field(description, "hidden_size", None)
    if hidden is None:
        raise ValueError("the OPT config has no hidden_size")
    required = {
        # field: (value trainops needs, what that means)
        "do_layer_norm_before": (True, "pre-LayerNorm blocks"),
        "activation_function": ("relu", "a ReLU feed-forward"),
        "ffn_dim": (4 * hidden, "a feed-forward of 4 x hidden_size"),
        "word_embed_proj_dim": (hidden, "no project_in/project_out (word_embed_proj_dim == hidden_size)"),
        "enable_bias": (True, "biases on every linear layer"),
        "layer_norm_elementwise_affine": (True, "LayerNorm gains and biases"),
        "_remove_final_layer_norm": (False, "the final LayerNorm"),
        "tie_word_embeddings": (True, "the output projection tied to the token embedding"),
    }
    for name, (needed, meaning) in required.items():
        # A field a config.json leaves out takes OPTConfig's default, which is the value trainops needs
        # (word_embed_proj_dim defaults to hidden_size).
        value = _field(description, name, needed)
        if name == "word_embed_proj_dim" and value is None:
            value = hidden
        if value != needed:
            raise ValueError(
                f"OPT config {name}={value!r}: trainops's model has {meaning} ({name}={needed!r})"
            )
    return ModelConfig(
        n_layers=int(_field(description, "num_hidden_layers", 0)),
        n_heads=int(_field(description, "num_attention_heads", 0)),
        d_model=int(hidden),
        vocab_size=int(_field(description, "vocab_size", 0)),
        max_seq_len=int(_field(description, "max_position_embeddings", 0)),
        dropout=float(_field(description, "dropout", 0.1)),
        init_std=float(_field(description, "init_std", 0.006)),
    )


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `transformers.OPTConfig` (or the fields of a config.json) describing `cfg`.

    trainops has one dropout probability, applied to attention probabilities and both residual branches, so it
    is both `dropout` and `attention_dropout`. Token ids (pad/bos/eos) are the tokenizer's business and are
    left to OPTConfig's defaults (OPT's GPT-2 vocabulary: pad 1, bos = eos = 2).
    """
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "ffn_dim": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "word_embed_proj_dim": cfg.d_model,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "layerdrop": 0.0,
        "init_std": cfg.init_std,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
    }


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """trainops name -> Hugging Face name (without prefix) for every parameter except the fused qkv."""
    names = {
        "embed_tokens.weight": "embed_tokens.weight",
        "embed_positions.weight": "embed_positions.weight",
        "final_layer_norm.weight": "final_layer_norm.weight",
        "final_layer_norm.bias": "final_layer_norm.bias",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK_RENAMES.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"layers.{i}.{theirs}.{kind}"
    return names


def _strip_prefix(
    hf_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(decoder tensors by unprefixed name, lm_head.weight or None) of an OPTForCausalLM or OPTModel dict."""
    prefix = CAUSAL_LM_PREFIX if any(k.startswith(CAUSAL_LM_PREFIX) for k in hf_state) else BASE_MODEL_PREFIX
    decoder: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in hf_state.items():
        if name.startswith(prefix):
            decoder[name.removeprefix(prefix)] = tensor
        elif name != LM_HEAD:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"not part of an OPT decoder under {prefix!r}: {', '.join(sorted(unexpected)[:5])}")
    return decoder, hf_state.get(LM_HEAD)


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face OPT state dict -> trainops's `OPTModel.state_dict()` names and layout.

    `lm_head.weight` may be absent (save_pretrained drops tied weights); when present it must equal the token
    embedding, because trainops's output projection *is* that table.
    """
    decoder, lm_head = _strip_prefix(hf_state)
    names = _hf_names(cfg)
    qkv_names = {
        f"layers.{i}.self_attn.{proj}.{kind}"
        for i in range(cfg.n_layers)
        for proj in _QKV
        for kind in ("weight", "bias")
    }
    expected = set(names.values()) | qkv_names
    missing, extra = sorted(expected - decoder.keys()), sorted(decoder.keys() - expected)
    if missing or extra:
        raise ValueError(
            f"the OPT state dict does not match a {cfg.n_layers}-layer decoder: "
            f"missing {missing[:5]}, unexpected {extra[:5]} (project_in/project_out are not supported)"
        )
    if lm_head is not None and not torch.equal(lm_head, decoder["embed_tokens.weight"]):
        raise ValueError(
            "lm_head.weight differs from embed_tokens.weight: trainops ties the output projection"
        )
    ours = {mine: decoder[theirs] for mine, theirs in names.items()}
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            ours[f"layers.{i}.attn.qkv.{kind}"] = torch.cat(
                [decoder[f"layers.{i}.self_attn.{proj}.{kind}"] for proj in _QKV], dim=0
            )
    return ours


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """trainops's `OPTModel.state_dict()` -> an `OPTForCausalLM` state dict, `lm_head.weight` included (it
    is the token embedding's tensor, as tied parameters are). The q/k/v pieces are copies, not views of the
    fused matrix, so the result can be saved by formats that refuse tensors sharing storage."""
    names = _hf_names(cfg)
    expected = set(names) | {
        f"layers.{i}.attn.qkv.{kind}" for i in range(cfg.n_layers) for kind in ("weight", "bias")
    }
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        raise ValueError(f"not a trainops OPTModel state dict: missing {missing[:5]}, unexpected {extra[:5]}")
    hf = {CAUSAL_LM_PREFIX + theirs: state[mine] for mine, theirs in names.items()}
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            pieces = state[f"layers.{i}.attn.qkv.{kind}"].chunk(len(_QKV), dim=0)
            for proj, piece in zip(_QKV, pieces, strict=True):
                hf[f"{CAUSAL_LM_PREFIX}layers.{i}.self_attn.{proj}.{kind}"] = piece.clone()
    hf[LM_HEAD] = state["embed_tokens.weight"]
    return hf


def model_from_hf(
    description: Mapping[str, Any] | object,
    hf_state: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
) -> OPTModel:
    """A trainops OPTModel holding a Hugging Face OPT model's weights (strict load: every parameter)."""
    cfg = model_config_from_hf(description)
    model = build_model(cfg, device=device)
    model.load_state_dict(state_dict_from_hf(hf_state, cfg), strict=True)
    return model


def export_to_hf(model: OPTModel) -> dict[str, torch.Tensor]:
    """An unsharded trainops model's weights as an `OPTForCausalLM` state dict (config: hf_config_kwargs)."""
    return state_dict_to_hf(model.state_dict(), model.cfg)
