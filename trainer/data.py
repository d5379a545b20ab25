"""Tokenised text stream: local text files -> byte-level BPE ids -> deterministic, resumable batches.

Nothing is downloaded. The tokenizer is either a GPT-2-style `vocab.json` + `merges.txt` the user supplies,
or a
byte-level BPE trained with `tokenizers` on the corpus at first use and cached (so a resumed run re-reads
exactly
the same ids). The default corpus ships in `trainer/data/corpus.txt`.

Batches are a pure function of (global batch index, rank, world size): sequence `g` of the run is window
`perm_epoch[g mod n]` of the token array, with a fresh seeded permutation per epoch. The data position in a
checkpoint is therefore one integer, and `skip_batches` is an addition.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_CORPUS = Path(__file__).parent / "data" / "corpus.txt"
END_OF_DOCUMENT = "</s>"


def read_corpus(path: str | Path | None) -> str:
    """One file, or every `*.txt` under a directory (sorted), joined by end-of-document markers."""
    root = Path(path) if path else DEFAULT_CORPUS
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no text files at {root}")
    return END_OF_DOCUMENT.join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """GPT-2-style byte-level BPE trained on `text` (deterministic for a given text and size)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_DOCUMENT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split(END_OF_DOCUMENT), trainer=trainer)
    return tok


def load_user_tokenizer(directory: str | Path) -> Tokenizer:
    """A GPT-2 tokenizer from the user's `vocab.json` and `merges.txt` (no network)."""
    d = Path(directory)
    tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def prepare_tokens(
    *, corpus: str | None, cache_dir: Path, vocab_size: int, tokenizer_dir: str | None
) -> tuple[Path, Path]:
    """Build (or reuse) the tokenizer and the token array; returns their cached paths. Run on one rank."""
    text = read_corpus(corpus)
    source = tokenizer_dir or f"bpe{vocab_size}"
    key = hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = cache_dir / f"tokenizer-{key}.json", cache_dir / f"tokens-{key}.npy"
    if not tok_path.exists():
        tok = load_user_tokenizer(tokenizer_dir) if tokenizer_dir else train_tokenizer(text, vocab_size)
        _atomic_write_bytes(tok_path, tok.to_str().encode())
    if not ids_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
        eod = tok.token_to_id(END_OF_DOCUMENT)
        ids: list[int] = []
        for doc in text.split(END_OF_DOCUMENT):
            ids.extend(tok.encode(doc).ids)
            if eod is not None:
                ids.append(eod)
        dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.int32
        tmp = ids_path.with_name(f".{ids_path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.asarray(ids, dtype=dtype))
        os.replace(tmp, ids_path)
    return tok_path, ids_path


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (micro_batch, seq_len) int64
    targets: torch.Tensor  # (micro_batch, seq_len) int64, inputs shifted by one


class TokenStream:
    """Deterministic training/validation windows over one token array (last `val_fraction` held out)."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int, val_fraction: float = 0.05) -> None:
        n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
        if len(tokens) - n_val < 2 * (seq_len + 1):
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len {seq_len}")
        self.train = torch.from_numpy(tokens[:-n_val].astype(np.int64))
        self.val = torch.from_numpy(tokens[-n_val:].astype(np.int64))
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(self.train) - 1) // seq_len

    @lru_cache(maxsize=2)  # noqa: B019 -- one stream per process, two live epochs at most
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(
            self.n_windows, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
        )

    def sequence(self, index: int) -> torch.Tensor:
        """The `index`-th training sequence of the run (seq_len + 1 tokens)."""
        epoch, offset = divmod(index, self.n_windows)
        start = int(self._permutation(epoch)[offset]) * self.seq_len
        return self.train[start : start + self.seq_len + 1]

    def batch(
        self, *, step_index: int, micro_index: int, rank: int, world: int, micro_batch: int, accum_steps: int
    ) -> Batch:
        """Micro-batch `micro_index` of rank `rank` in global batch `step_index` (0-based).

        The global batch is the same set of sequences for any (world, accum_steps) split of it.
        """
        per_step = world * accum_steps * micro_batch
        first = step_index * per_step + (micro_index * world + rank) * micro_batch
        rows = torch.stack([self.sequence(first + i) for i in range(micro_batch)])
        return Batch(inputs=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())

    def val_batches(self, *, n_batches: int, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        """Fixed validation windows (no shuffling), split across ranks, cycling if the split is small."""
        n = (len(self.val) - 1) // self.seq_len
        for b in range(n_batches):
            idx = [((b * world + rank) * micro_batch + i) % n for i in range(micro_batch)]
            rows = torch.stack(
                [self.val[j * self.seq_len : j * self.seq_len + self.seq_len + 1] for j in idx]
            )
            yield Batch(inputs=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())
