"""The OPT model: Table 1 sizes, the paper's initialisation and architecture, the FLOPs formula."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model import (
    POSITION_OFFSET,
    POSITION_PAD_ROW,
    PRESETS,
    ModelConfig,
    build_model,
    flops_per_token,
    init_weights,
    preset_model_config,
)

NOMINAL = {
    "125M": 125e6,
    "350M": 350e6,
    "1.3B": 1.3e9,
    "2.7B": 2.7e9,
    "6.7B": 6.7e9,
    "13B": 13e9,
    "30B": 30e9,
    "66B": 66e9,
    "175B": 175e9,
}


@pytest.mark.parametrize("name", list(NOMINAL))
def test_each_opt_preset_has_the_parameter_count_its_name_says(name: str) -> None:
    model = build_model(PRESETS[name].model)  # meta device: nothing allocated, even for 175B
    assert next(model.parameters()).device.type == "meta"
    assert model.num_params() == pytest.approx(NOMINAL[name], rel=0.04)


def test_presets_follow_table_1() -> None:
    rows = {
        n: (p.model.n_layers, p.model.n_heads, p.model.d_model, p.peak_lr, p.batch_tokens / 2**20)
        for n, p in PRESETS.items()
        if n in NOMINAL
    }
    assert rows["125M"] == (12, 12, 768, 6.0e-4, 0.5)
    assert rows["1.3B"] == (24, 32, 2048, 2.0e-4, 1)
    assert rows["175B"] == (96, 96, 12288, 1.2e-4, 2)
    assert PRESETS["175B"].warmup_steps == 2000 and PRESETS["125M"].warmup_tokens == 375_000_000
    assert all(PRESETS[n].model.max_seq_len == 2048 and PRESETS[n].model.vocab_size == 50272 for n in NOMINAL)


def test_initialisation_follows_opt() -> None:
    cfg = ModelConfig(n_layers=8, n_heads=4, d_model=256, vocab_size=4096, max_seq_len=64)
    model = build_model(cfg, device="cpu")
    init_weights(model, seed=0)
    block = model.layers[0]
    assert block.fc1.weight.std().item() == pytest.approx(0.006, rel=0.02)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.006, rel=0.02)
    for out_proj in (block.attn.out_proj.weight, block.fc2.weight):
        assert out_proj.std().item() == pytest.approx(0.006 / math.sqrt(2 * 8), rel=0.03)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    assert torch.equal(block.ln_attn.weight, torch.ones(256))
    assert block.fc1.out_features == 4 * cfg.d_model  # ReLU FFN of 4 x d_model


def test_init_is_a_function_of_the_seed_only() -> None:
    cfg = preset_model_config("tiny")
    a, b = build_model(cfg, device="cpu"), build_model(cfg, device="cpu")
    init_weights(a, seed=3)
    torch.manual_seed(999)  # the global RNG must not matter
    init_weights(b, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_output_embedding_is_tied_and_embeddings_have_no_dropout() -> None:
    cfg = preset_model_config("tiny", dropout=0.5)
    model = build_model(cfg, device="cpu")
    init_weights(model, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (2, 16, cfg.vocab_size)
        model.embed_tokens.weight[tokens[0, 0]] += 1.0  # the output projection moves with the input table
        assert not torch.equal(model(tokens), logits)
    # In training mode with dropout 0.5 the embedding sum reaching block 0 is still untouched.
    seen: list[torch.Tensor] = []
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.train()
    model(tokens)
    expected = model.embed_tokens(tokens) + model.embed_positions(torch.arange(16) + POSITION_OFFSET)
    assert torch.equal(seen[0], expected)


def test_positions_have_opts_offset_of_2_and_a_zero_pad_row() -> None:
    # OPT's layout (metaseq, Hugging Face): 2050 rows for 2048 tokens, position p reads row p + 2.
    assert build_model(PRESETS["125M"].model).embed_positions.weight.shape == (2050, 768)
    cfg = preset_model_config("tiny", dropout=0.0)
    model = build_model(cfg, device="cpu").eval()
    init_weights(model, seed=4)
    table = model.embed_positions.weight
    assert table.shape == (cfg.max_seq_len + 2, cfg.d_model)
    assert POSITION_PAD_ROW == 1 and not table[:POSITION_OFFSET].any() and table[POSITION_OFFSET:].all()
    # The drawn rows are the values a table without the offset got: the init stream is unchanged.
    gen = torch.Generator().manual_seed(4)
    torch.empty(cfg.vocab_size, cfg.d_model).normal_(0.0, cfg.init_std, generator=gen)  # embed_tokens first
    expected = torch.empty(cfg.max_seq_len, cfg.d_model).normal_(0.0, cfg.init_std, generator=gen)
    assert torch.equal(table[POSITION_OFFSET:], expected)
    # Moving the last row a full-length sequence reads changes the last position's logits only.
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len))
    with torch.no_grad():
        before = model(tokens)
        table[cfg.max_seq_len + 1] *= -1.0  # not a constant shift, which the LayerNorms would remove
        after = model(tokens)
    assert torch.allclose(after[0, :-1], before[0, :-1], atol=1e-6)
    assert not torch.allclose(after[0, -1], before[0, -1], atol=1e-3)
    with pytest.raises(ValueError, match="exceeds max_seq_len 128"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_causal_attention_does_not_look_ahead() -> None:
    model = build_model(preset_model_config("tiny"), device="cpu").eval()
    init_weights(model, seed=2)
    tokens = torch.randint(0, 2048, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 2048
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0, :8], model(changed)[0, :8], atol=1e-6)


def test_flops_formula_matches_6n_plus_attention() -> None:
    cfg = PRESETS["175B"].model
    n = build_model(cfg).num_params(exclude_positions=True)
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 96 * 12288 * 2048
