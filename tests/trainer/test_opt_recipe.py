"""The OPT recipe as metaseq ran it: weight decay on every parameter, `</s>` after every document in OPT's
dictionary from a user's GPT-2 vocab.json/merges.txt, packing into non-overlapping blocks, validation on by
default (docs/trainer.md, "Recipe against the paper and metaseq", names each test here)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from tokenizers import Tokenizer

from tests.trainer_helpers import REPO, explain, metrics, train_one_process, trainer_env
from trainer.config import ConfigError, TrainConfig, parse_args
from trainer.data import (
    END_OF_DOCUMENT_ID,
    TokenizerFilesError,
    TokenStream,
    prepare_tokens,
    read_user_vocabulary,
)
from trainer.model import build_model, init_weights, preset_model_config
from trainer.train import apply_optimizer_config, build_optimizer

# ---- a small GPT-2-format vocabulary, and GPT-2's own encoder as the reference (openai/gpt-2 src/encoder.py)


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> symbol table; GPT-2's vocab.json gives these 256 symbols ids 0..255 in this order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_SYMBOLS = gpt2_bytes_to_unicode()
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("a", "t"),
    ("Ġ", "c"),
    ("Ġc", "at"),
    ("Ġ", "s"),
    ("Ġs", "at"),
    ("o", "n"),
    ("Ġ", "on"),
    ("e", "n"),
    ("Ġ", "m"),
    ("Ġm", "at"),
]
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def gpt2_vocab() -> dict[str, int]:
    """GPT-2's layout: the 256 byte symbols, then one token per merge, then `<|endoftext|>`; no `</s>`."""
    tokens = [*BYTE_SYMBOLS.values(), *(a + b for a, b in MERGES), "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def opt_vocab() -> dict[str, int]:
    """OPT's layout (metaseq's projects/OPT/assets/gpt2-vocab.json): `<s> <pad> </s> <unk>` at 0..3, then the
    GPT-2 tokens in another order (OPT's follows fairseq's dict.txt; here reversed)."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *reversed(list(gpt2_vocab()))]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_dir(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return directory


def gpt2_reference_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """openai/gpt-2's Encoder.encode (regex pre-split, bytes -> symbols, lowest-rank merge first)."""
    ranks = {pair: r for r, pair in enumerate(merges)}
    ids: list[int] = []
    for piece in GPT2_PATTERN.findall(text):
        word = tuple(BYTE_SYMBOLS[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(vocab[t] for t in word)
    return ids


DOCUMENTS = [
    "the cat sat on the mat.\n\n",
    "then the men sat on 42 mats; café  \n",
    "  the end\n",
]


def write_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(DOCUMENTS):
        (directory / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return directory


def test_gpt2_vocab_gets_opt_dictionary_ids_and_eos_after_every_document(tmp_path: Path) -> None:
    """GPT-2's vocab.json (no `</s>`): OPT's four specials at 0..3, GPT-2 token t at its id + 4, and each
    document is GPT-2's encoding of text.rstrip() followed by `</s>` = 2 (metaseq's _tokenize_one_json)."""
    vocab = gpt2_vocab()
    user = write_tokenizer_dir(tmp_path / "gpt2", vocab, MERGES)
    _, ids_path = prepare_tokens(
        corpus=str(write_corpus(tmp_path / "corpus")),
        cache_dir=tmp_path / "cache",
        vocab_size=999,
        tokenizer_dir=str(user),
    )
    expected: list[int] = []
    for doc in DOCUMENTS:
        expected += [i + 4 for i in gpt2_reference_encode(doc.rstrip(), vocab, MERGES)] + [END_OF_DOCUMENT_ID]
    assert np.load(ids_path).tolist() == expected
    assert expected.count(2) == len(DOCUMENTS)
    mapped, _ = read_user_vocabulary(user)
    assert [mapped[s] for s in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert mapped["Ġthe"] == vocab["Ġthe"] + 4 and mapped["<|endoftext|>"] == len(vocab) + 3


def test_opt_layout_vocab_is_used_as_it_is(tmp_path: Path) -> None:
    """OPT's own vocab.json (specials at 0..3, its own token order): ids are the file's, `</s>` = 2."""
    vocab = opt_vocab()
    user = write_tokenizer_dir(tmp_path / "opt", vocab, MERGES)
    _, ids_path = prepare_tokens(
        corpus=str(write_corpus(tmp_path / "corpus")),
        cache_dir=tmp_path / "cache",
        vocab_size=999,
        tokenizer_dir=str(user),
    )
    expected: list[int] = []
    for doc in DOCUMENTS:
        expected += [*gpt2_reference_encode(doc.rstrip(), vocab, MERGES), 2]
    assert np.load(ids_path).tolist() == expected and vocab["Ġthe"] != gpt2_vocab()["Ġthe"] + 4


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v, m: ({**v, "</s>": 9999}, m), r"</s>=9999, <unk>=3; OPT's dictionary needs <s>=0"),
        (lambda v, m: ({t: i for t, i in v.items() if t != "Ġ"}, m), "lacks 1 of the 256 byte-level"),
        (lambda v, m: (v, [*m, ("q", "z")]), r"'qz' is not in vocab.json"),
        (lambda v, m: ({**v, "x": "7"}, m), r"id of 'x' is '7'"),
    ],
)
def test_unusable_tokenizer_files_are_a_config_error(tmp_path: Path, mutate: object, message: str) -> None:
    vocab, merges = mutate(opt_vocab(), MERGES)  # type: ignore[operator]
    user = write_tokenizer_dir(tmp_path / "bad", vocab, merges)
    with pytest.raises(TokenizerFilesError, match=message):
        read_user_vocabulary(user)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--tokenizer-dir", str(user)])
    (user / "merges.txt").unlink()
    with pytest.raises(ConfigError, match=r"no merges\.txt"):
        parse_args(["--tokenizer-dir", str(user)])


def test_trained_bpe_has_opt_specials_and_eos_closes_each_document(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "doc3.txt").write_text("the cat sat on the mat. " * 60)
    tok_path, ids_path = prepare_tokens(
        corpus=str(corpus), cache_dir=tmp_path, vocab_size=300, tokenizer_dir=None
    )
    tok = Tokenizer.from_file(str(tok_path))
    assert [tok.token_to_id(s) for s in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    ids = np.load(ids_path).tolist()
    ends = [i for i, t in enumerate(ids) if t == 2]
    assert len(ends) == len(DOCUMENTS) + 1 and ends[-1] == len(ids) - 1


def test_blocks_are_seq_len_plus_one_tokens_and_do_not_overlap() -> None:
    """metaseq's block_size = tokens_per_sample + 1 with sample_break_mode none: a block's first token is
    never a target, and the blocks of an epoch tile the training split."""
    tokens = np.arange(2000, dtype=np.uint16)
    stream = TokenStream(tokens, seq_len=16, seed=3)
    blocks = [stream.sequence(i) for i in range(stream.n_windows)]
    assert all(len(b) == 17 and torch.equal(b, torch.arange(int(b[0]), int(b[0]) + 17)) for b in blocks)
    assert sorted(int(b[0]) for b in blocks) == list(range(0, 17 * stream.n_windows, 17))
    val = next(stream.val_batches(n_batches=1, rank=0, world=1, micro_batch=2))
    assert torch.equal(val.inputs[1, :1] - val.inputs[0, :1], torch.tensor([17]))


# ---- weight decay ------------------------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    model = build_model(preset_model_config("tiny"), device="cpu")
    init_weights(model, seed=1)
    return model


def decay_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    by_param = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_fp16_recipe_decays_every_parameter_as_metaseq() -> None:
    model = tiny_model()
    cfg = TrainConfig(precision="fp16")
    assert cfg.weight_decay_all_params is True
    optimizer = build_optimizer(model, cfg)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    decay = decay_of(optimizer, model)
    assert len(decay) == len(list(model.parameters())) and set(decay.values()) == {0.1}
    assert "final_layer_norm.weight" in decay and "layers.0.fc1.bias" in decay

    # metaseq's Adam step on a parameter with a zero gradient: p -= lr * wd * p, for every parameter
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 1e-2
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] * (1 - 1e-2 * 0.1), rtol=0, atol=1e-7), name
    assert not torch.equal(model.final_layer_norm.weight, before["final_layer_norm.weight"])


def test_without_it_only_2d_parameters_decay_position_table_included() -> None:
    model = tiny_model()
    for cfg in (TrainConfig(precision="bf16"), TrainConfig(weight_decay_all_params=False)):
        decay = decay_of(build_optimizer(model, cfg), model)
        assert {n for n, wd in decay.items() if wd == 0.1} == {
            n for n, p in model.named_parameters() if p.ndim == 2
        }
        assert decay["embed_positions.weight"] == 0.1 and decay["embed_tokens.weight"] == 0.1
        assert decay["final_layer_norm.weight"] == 0.0 and decay["layers.1.attn.qkv.bias"] == 0.0
    assert TrainConfig(precision="fp32", weight_decay_all_params=True).weight_decay_all_params is True


def test_a_checkpoints_optimizer_groups_do_not_override_the_configured_decay() -> None:
    model = tiny_model()
    old = build_optimizer(model, TrainConfig(weight_decay_all_params=False, beta2=0.99))
    new_cfg = TrainConfig(weight_decay_all_params=True)
    optimizer = build_optimizer(model, new_cfg)
    optimizer.load_state_dict(old.state_dict())  # what resuming does: the saved groups come back ...
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["betas"][1] == 0.99
    apply_optimizer_config(optimizer, new_cfg)  # ... and train() puts the configured ones back
    assert set(decay_of(optimizer, model).values()) == {0.1} and optimizer.param_groups[0]["betas"][1] == 0.95


def test_flags_for_decay_and_validation() -> None:
    default = parse_args([])
    assert (default.weight_decay_all_params, default.val_interval, default.val_batches) == (True, 100, 2)
    assert parse_args(["--precision", "bf16"]).weight_decay_all_params is False
    assert parse_args(["--precision", "bf16", "--weight-decay-all-params"]).weight_decay_all_params is True
    assert parse_args(["--no-weight-decay-all-params"]).weight_decay_all_params is False
    assert parse_args(["--val-interval", "0"]).val_interval == 0
    with pytest.raises(ConfigError, match="weight_decay must be >= 0"):
        parse_args(["--weight-decay", "-0.1"])


# ---- end to end: one process, the user's GPT-2 vocabulary, default validation ----------------------------


@pytest.mark.slow
def test_run_on_a_gpt2_vocab_validates_at_its_last_step_by_default(tmp_path: Path) -> None:
    """`python -m trainer.train` (a world of one) on a user's GPT-2 vocab: the token array has `</s>` after
    each document, the model trains on it, and with the default interval (100) validation runs once, at the
    last step, as metaseq validates when training stops."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(
            f"the cat {i} sat on the mat, then the men sat on {i * 7} mats. " * 12
        )
    user = write_tokenizer_dir(tmp_path / "gpt2", gpt2_vocab(), MERGES)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "trainer.train", "--preset", "tiny", "--max-steps", "3"),
            *("--precision", "fp32", "--micro-batch-size", "2", "--global-batch-tokens", "256"),
            *("--threads", "1", "--corpus", str(corpus), "--tokenizer-dir", str(user)),
            *("--run-dir", str(run_dir)),
        ],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, explain(result)
    ids = np.load(next((run_dir / "cache").glob("tokens-*.npy"))).tolist()
    assert ids.count(2) == 8 and ids[-1] == 2 and min(ids) >= 2
    log = (run_dir / "trainer.log").read_text()
    assert '"weight_decay_all_params": false' in log and '"val_interval": 100' in log
    points = metrics(run_dir)
    assert [p["step"] for p in points] == [1, 2, 3]
    assert [("val_loss" in p["values"]) for p in points] == [False, False, True]
    assert 0 < points[-1]["values"]["val_loss"] < 20


def test_a_checkpoint_resumed_on_other_data_is_refused(tmp_path: Path) -> None:
    """A checkpoint records the token array's key (format, tokenizer, documents); resuming it on another
    corpus (or tokenizer, or tokenization) would silently train on other ids at the same data position: the
    trainer refuses with its configuration exit, which the orchestrator does not retry."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"the cat {i} sat on the mat. " * 40)
    run_dir = tmp_path / "run"

    def train(*flags: str) -> subprocess.CompletedProcess[str]:
        return train_one_process(run_dir, "fp32", *flags)

    first = train("--max-steps", "2", "--corpus", str(corpus))
    assert first.returncode == 0, explain(first)
    (corpus / "d0.txt").write_text("a different first document. " * 40)
    refused = train("--max-steps", "4", "--corpus", str(corpus), "--resume-from", "latest")
    assert refused.returncode == 2, explain(refused)
    assert "was trained on data" in refused.stderr and "other token ids" in refused.stderr
    (corpus / "d0.txt").write_text("the cat 0 sat on the mat. " * 40)  # the data it was trained on
    resumed = train("--max-steps", "4", "--corpus", str(corpus), "--resume-from", "latest")
    assert resumed.returncode == 0, explain(resumed)
    assert [p["step"] for p in metrics(run_dir)][-2:] == [3, 4]


def test_every_test_the_recipe_table_names_exists() -> None:
    """docs/trainer.md's recipe table says which test checks each element; a renamed or deleted test must
    not leave the table claiming a check nobody runs. Each `file.py::test_name` (a parametrised case's
    `[id]` dropped) must be a test function of that file under tests/, each bare `file.py` a file there."""
    text = (REPO / "docs" / "trainer.md").read_text()
    section = text.split("## Recipe against the paper and metaseq", 1)[1].split("\n## ", 1)[0]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| element")
    ]
    assert len(rows) >= 20, "the recipe table was not found"
    named = 0
    for row in rows:
        checked_by = row.rstrip(" |").rsplit(" | ", 1)[1]
        for ref in regex.findall(r"`([\w/]+\.py)(?:::(\w+)(?:\[[^\]]*\])?)?`", checked_by):
            file_name, test_name = ref
            found = sorted((REPO / "tests").rglob(Path(file_name).name))
            assert found, f"{file_name} (recipe row {row[:40]!r}) is not a file under tests/"
            if test_name:
                sources = [path.read_text() for path in found]
                assert any(regex.search(rf"^def {test_name}\(", s, regex.M) for s in sources), (
                    f"{file_name}::{test_name} (recipe row {row[:40]!r}) is not a test there"
                )
                named += 1
    assert named >= 30  # the table names its tests; a parse that found none would pass anything
