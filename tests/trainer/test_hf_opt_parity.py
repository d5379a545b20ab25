"""Parity with an OPT implementation nobody here wrote: Hugging Face `transformers`' OPTForCausalLM.

For the `tiny` preset and the 125M preset (Table 1: 12 layers, 12 heads, d_model 768, vocab 50272, 2048
positions), both models are built from configs made in code and random weights (nothing is downloaded: the
hub is offline). Weights go through `trainer.hf_opt` in each direction and the two models must give the same
logits (fp32, eval mode; atol 1e-4, rtol 0) and the same loss on the same batch (atol 1e-5).

Every parameter is re-drawn at a scale where each one changes the logits (LayerNorm gains around 1, biases
and the rows positions read all non-zero): OPT's own init (weights 0.006, biases 0, gains 1) leaves the
blocks so close to the identity that a swapped q/k or LayerNorm pair would still pass a 1e-4 tolerance.
Hugging Face's attention is its eager (matmul + softmax) path, not the fused kernel trainops uses.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, whatever the environment says
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from trainer.data import Batch
from trainer.hf_opt import (
    LM_HEAD,
    export_to_hf,
    hf_config_kwargs,
    model_config_from_hf,
    model_from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from trainer.model import POSITION_OFFSET, ModelConfig, OPTModel, build_model, preset_model_config

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
SEQ_LEN = 24  # short: the 125M case has to stay cheap on two CPU cores
WEIGHT_BOUND = 0.1


@torch.no_grad()
def scramble(model: nn.Module, seed: int) -> None:
    """Every parameter random: matrices and biases uniform in +-0.1 (std 0.058; uniform draws cost half what
    normal ones do, and the 125M case draws 250M of them), LayerNorm gains 1 + that."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.uniform_(-WEIGHT_BOUND, WEIGHT_BOUND, generator=gen)
            if isinstance(module, nn.LayerNorm) and name == "weight":
                param.add_(1.0)


def same_batch(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, Batch]:
    """SEQ_LEN + 1 random tokens: Hugging Face reads them with labels = input_ids (it shifts inside), trainops
    reads them as trainer.data does (inputs = all but the last, targets = all but the first)."""
    rows = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))
    return rows, Batch(inputs=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())


def assert_same_outputs(ours: OPTModel, hf: OPTForCausalLM, seed: int) -> None:
    rows, batch = same_batch(ours.cfg, seed)
    with torch.no_grad():
        hf_out = hf(input_ids=rows, labels=rows)
        our_logits = ours(batch.inputs)
        our_loss = F.cross_entropy(our_logits.float().flatten(0, 1), batch.targets.flatten())  # as train.py
    # Hugging Face's last position predicts a token past the batch (its label is padded away), and
    # causality makes its other positions the logits of trainops's inputs.
    torch.testing.assert_close(our_logits, hf_out.logits[:, :-1], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(our_loss, hf_out.loss, atol=LOSS_ATOL, rtol=0)


@pytest.fixture(scope="module", params=["tiny", "125M"])
def pair(request: pytest.FixtureRequest) -> tuple[OPTModel, OPTForCausalLM]:
    """A trainops model and an OPTForCausalLM of the same preset, both fp32 and in eval mode."""
    cfg = preset_model_config(request.param)
    hf_config = OPTConfig(**hf_config_kwargs(cfg))
    hf_config._attn_implementation = "eager"
    hf = OPTForCausalLM(hf_config).eval()
    ours = build_model(cfg).to_empty(device="cpu").eval()  # as the trainer does: no throw-away default init
    return ours, hf


def test_125m_is_table_1s_row_with_opts_2050_position_rows() -> None:
    cfg = preset_model_config("125M")
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.vocab_size, cfg.max_seq_len) == (
        12,
        12,
        768,
        50272,
        2048,
    )
    hf = OPTConfig(**hf_config_kwargs(cfg))
    assert model_config_from_hf(hf) == cfg
    assert build_model(cfg).embed_positions.weight.shape == (2048 + POSITION_OFFSET, 768)


def test_hugging_face_weights_in_trainops_give_the_same_logits_and_loss(
    pair: tuple[OPTModel, OPTForCausalLM],
) -> None:
    ours, hf = pair
    scramble(hf, seed=1)
    hf_state = hf.state_dict()
    assert LM_HEAD in hf_state  # the tied output projection is in the dict as transformers gives it
    ours.load_state_dict(state_dict_from_hf(hf_state, ours.cfg), strict=True)
    assert_same_outputs(ours, hf, seed=3)


def test_trainops_weights_in_hugging_face_give_the_same_logits_and_loss(
    pair: tuple[OPTModel, OPTForCausalLM],
) -> None:
    ours, hf = pair
    scramble(ours, seed=2)
    hf.load_state_dict(export_to_hf(ours), strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.model.decoder.embed_tokens.weight.data_ptr()  # still tied
    assert_same_outputs(ours, hf, seed=4)


def test_import_then_export_gives_back_every_hugging_face_tensor_bit_for_bit() -> None:
    cfg = preset_model_config("tiny")
    hf = OPTForCausalLM(OPTConfig(**hf_config_kwargs(cfg)))
    scramble(hf, seed=7)
    hf_state = hf.state_dict()
    back = state_dict_to_hf(state_dict_from_hf(hf_state, cfg), cfg)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[name], hf_state[name]) for name in hf_state)


def test_a_published_layout_without_lm_head_and_under_decoder_loads() -> None:
    # save_pretrained drops the tied lm_head; the first facebook/opt-* files were saved from OPTModel
    # ("decoder." prefix) and their config.json is read as a plain dict.
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=8, vocab_size=16, max_seq_len=6)
    source = build_model(cfg, device="cpu")
    scramble(source, seed=5)
    published = {
        name.replace("model.decoder.", "decoder.", 1): tensor
        for name, tensor in export_to_hf(source).items()
        if name != LM_HEAD
    }
    loaded = model_from_hf(dict(hf_config_kwargs(cfg), architectures=["OPTModel"]), published)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), source.parameters(), strict=True))


def test_opt_variants_trainops_does_not_build_are_refused_by_name() -> None:
    base = hf_config_kwargs(ModelConfig(n_layers=1, n_heads=2, d_model=8, vocab_size=16, max_seq_len=6))
    opt_350m_like = {**base, "word_embed_proj_dim": 4, "do_layer_norm_before": False}
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        model_config_from_hf(opt_350m_like)
    with pytest.raises(ValueError, match="word_embed_proj_dim=4"):
        model_config_from_hf({**base, "word_embed_proj_dim": 4})
    with pytest.raises(ValueError, match="activation_function='gelu'"):
        model_config_from_hf({**base, "activation_function": "gelu"})
    cfg = model_config_from_hf(base)
    source = build_model(cfg, device="cpu")
    scramble(source, seed=6)
    hf_state = state_dict_to_hf(source.state_dict(), cfg)
    untied = {**hf_state, LM_HEAD: hf_state[LM_HEAD] + 1.0}
    with pytest.raises(ValueError, match="ties the output projection"):
        state_dict_from_hf(untied, cfg)
    with_projection = {**hf_state, "model.decoder.project_in.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match=r"unexpected \['project_in.weight'\]"):
        state_dict_from_hf(with_projection, cfg)
