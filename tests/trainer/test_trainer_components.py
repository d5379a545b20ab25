"""Trainer components on their own: LR schedule, loss scaler, data stream, tokenizer, fault specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from trainer.data import DEFAULT_CORPUS, TokenStream, prepare_tokens, read_documents
from trainer.faults import FaultInjector, parse_fault
from trainer.precision import DynamicLossScaler
from trainer.schedule import LRSchedule


def test_lr_warms_up_linearly_then_decays_to_ten_percent_of_peak() -> None:
    s = LRSchedule(peak_lr=6e-4, warmup_steps=10, total_steps=110)
    assert s.lr_at(1) == pytest.approx(6e-5) and s.lr_at(10) == pytest.approx(6e-4)
    assert s.lr_at(60) == pytest.approx(6e-4 * (1 - 0.9 * 0.5))
    assert s.lr_at(110) == pytest.approx(6e-5) and s.lr_at(500) == pytest.approx(6e-5)
    s.scale = 0.5  # a mid-flight LR cut scales the whole curve
    assert s.lr_at(10) == pytest.approx(3e-4)


def test_loss_scale_halves_on_overflow_grows_after_a_clean_window_and_has_a_floor() -> None:
    scaler = DynamicLossScaler.for_precision("fp16", initial=8.0, window=3, floor=2.0)
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
