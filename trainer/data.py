"""Tokenised text stream: local documents -> byte-level BPE ids in OPT's dictionary -> deterministic,
resumable batches.

Nothing is downloaded. The tokenizer is either a GPT-2-format `vocab.json` + `merges.txt` the user supplies
(`load_user_tokenizer`), or a byte-level BPE trained with `tokenizers` on the corpus at first use
(`train_tokenizer`); either is cached, so a resumed run re-reads exactly the same ids. The default corpus
ships in `trainer/data/corpus/`, one document per file.

Ids follow OPT's dictionary (metaseq's `Dictionary`: `<s>` = 0, `<pad>` = 1, `</s>` = 2, `<unk>` = 3, then
the BPE tokens), and every document is encoded as metaseq's `StreamingLanguageModelingTask._tokenize_one_json`
does for OPT: `tokenizer.encode(text.rstrip()).ids + [eod]`, eod = the id of `</s>` (its
`end_of_document_symbol` default), so consecutive documents are separated by one `</s>` (id 2)
(facebookresearch/metaseq@f7ffa5f, metaseq/tasks/streaming_language_modeling.py).

Packing as metaseq's `DocumentToSequenceDataset` with OPT's `--sample-break-mode none` and
`block_size = tokens_per_sample + 1` (metaseq/launcher/opt_baselines.py): the token stream of all
documents is cut into non-overlapping blocks of seq_len + 1 tokens, inputs = block[:-1],
targets = block[1:], across document boundaries. The order differs (docs/trainer.md, "Recipe against the
paper and metaseq"): sequence `g` of the run is block `perm_epoch[g mod n]`, a fresh seeded permutation of
the blocks each epoch, so batches are a pure function of (global batch index, rank, world size), the data
position in a checkpoint is one integer, and `skip_batches` is an addition.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_CORPUS = Path(__file__).parent / "data" / "corpus"
OPT_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
"""OPT's dictionary starts with these four at ids 0..3 (metaseq `Dictionary`: bos, pad, eos, unk); metaseq's
streaming task asserts its tokenizer has them there, as OPT's own `gpt2-vocab.json` does."""
END_OF_DOCUMENT = "</s>"
END_OF_DOCUMENT_ID = 2
"""Id of `</s>`, the end-of-document symbol appended after every document (OPT's eos)."""
TOKENS_FORMAT = "opt-dict-v2"  # part of the cache key: bump when the ids or their layout change


class TokenizerFilesError(ValueError):
    """A user-supplied `vocab.json` / `merges.txt` that trainops cannot use (a configuration error)."""


def read_documents(path: str | Path | None) -> list[str]:
    """The corpus's documents, one per file: a file, or every `*.txt` under a directory (sorted)."""
    root = Path(path) if path else DEFAULT_CORPUS
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no text files at {root}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2-style byte-level BPE trained on the documents (deterministic for given documents and size), with
    OPT's four special tokens at ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(OPT_SPECIAL_TOKENS),  # added first, in order: ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def read_user_vocabulary(directory: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A GPT-2-format `vocab.json` (token -> id) and `merges.txt` (one merge `a b` per line, an optional
    `#version` first line), laid out as OPT's dictionary: raises `TokenizerFilesError` naming the problem.

    Two layouts are accepted:
    - OPT's own (metaseq's projects/OPT/assets/gpt2-vocab.json, the same as Hugging Face's `facebook/opt-*`
      vocab.json): `<s>`, `<pad>`, `</s>`, `<unk>` already at ids 0..3. Used as it is, so ids match published
      OPT weights (metaseq's streaming task asserts exactly this layout).
    - GPT-2's (none of the four present; `<|endoftext|>` = 50256): the four specials are put at 0..3 and every
      GPT-2 token at its GPT-2 id + 4, as metaseq's `Dictionary` lays out a symbol list after its specials.
      OPT's released vocabulary orders the GPT-2 tokens differently (by fairseq's dict.txt: "Hello" is
      31414 there, 15496 + 4 here), so use OPT's file to load or continue published OPT weights; the GPT-2
      file is for training from scratch.
    Every merge's parts and result must be tokens, and all 256 byte symbols of the byte-level alphabet must be
    (GPT-2's vocabulary has them; without one, text containing that byte would be dropped silently).
    """
    d = Path(directory)
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise TokenizerFilesError(
                f"tokenizer_dir {d}: no {p.name} (need GPT-2's vocab.json and merges.txt)"
            )
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFilesError(f"{vocab_path}: not readable JSON: {e}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFilesError(f"{vocab_path}: must be a JSON object of token -> id")
    bad = next((t for t, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0), None)
    if bad is not None:
        raise TokenizerFilesError(f"{vocab_path}: id of {bad!r} is {vocab[bad]!r}, not an integer >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerFilesError(f"{vocab_path}: two tokens share an id")

    present = [s for s in OPT_SPECIAL_TOKENS if s in vocab]
    if not present:  # GPT-2's layout: OPT's specials first, then the GPT-2 tokens in their order
        vocab = {**{s: i for i, s in enumerate(OPT_SPECIAL_TOKENS)}, **{t: i + 4 for t, i in vocab.items()}}
    elif any(vocab.get(s) != i for i, s in enumerate(OPT_SPECIAL_TOKENS)):
        where = ", ".join(f"{s}={vocab.get(s)}" for s in OPT_SPECIAL_TOKENS)
        raise TokenizerFilesError(
            f"{vocab_path}: has {where}; OPT's dictionary needs <s>=0, <pad>=1, </s>=2, <unk>=3 (as OPT's "
            "gpt2-vocab.json), or none of them (GPT-2's vocab.json, shifted by 4)"
        )
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise TokenizerFilesError(
            f"{vocab_path}: lacks {len(missing)} of the 256 byte-level symbols (e.g. {sorted(missing)[0]!r})"
        )

    merges: list[tuple[str, str]] = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFilesError(f"{merges_path}: not readable: {e}") from None
    for n, line in enumerate(lines, start=1):
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFilesError(f"{merges_path} line {n}: {line!r} is not two tokens `a b`")
        a, b = parts
        for token in (a, b, a + b):
            if token not in vocab:
                raise TokenizerFilesError(f"{merges_path} line {n}: {token!r} is not in vocab.json")
        merges.append((a, b))
    return vocab, merges


def load_user_tokenizer(directory: str | Path) -> ByteLevelBPETokenizer:
    """The user's GPT-2 tokenizer in OPT's layout (`read_user_vocabulary`), built as metaseq builds it for OPT
    (`ByteLevelBPETokenizer` of the vocab and merges: byte-level pre-tokenizer without prefix space, no
    normalizer, no unk, no special-token matching in the text). No network."""
    vocab, merges = read_user_vocabulary(directory)
    return ByteLevelBPETokenizer(vocab, merges, add_prefix_space=False)


def _user_files_digest(directory: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        h.update((Path(directory) / name).read_bytes())
    return h.hexdigest()


def encode_documents(tok: Tokenizer, documents: list[str]) -> list[int]:
    """metaseq's `_tokenize_one_json` for each document, concatenated: encode(text.rstrip()) + [`</s>`]."""
    eod = tok.token_to_id(END_OF_DOCUMENT)
    if eod != END_OF_DOCUMENT_ID:
        raise TokenizerFilesError(f"tokenizer has {END_OF_DOCUMENT} at id {eod}, not {END_OF_DOCUMENT_ID}")
    ids: list[int] = []
    for doc in documents:
        ids.extend(tok.encode(doc.rstrip()).ids)
        ids.append(eod)
    return ids


def prepare_tokens(
    *, corpus: str | None, cache_dir: Path, vocab_size: int, tokenizer_dir: str | None
) -> tuple[Path, Path]:
    """Build (or reuse) the tokenizer and the token array; returns their cached paths. Run on one rank."""
    documents = read_documents(corpus)
    source = f"user:{_user_files_digest(tokenizer_dir)}" if tokenizer_dir else f"bpe{vocab_size}"
    key = hashlib.sha256(f"{TOKENS_FORMAT}\0{source}\0{json.dumps(documents)}".encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = cache_dir / f"tokenizer-{key}.json", cache_dir / f"tokens-{key}.npy"
    if not tok_path.exists():
        tok: Tokenizer | ByteLevelBPETokenizer = (
            load_user_tokenizer(tokenizer_dir) if tokenizer_dir else train_tokenizer(documents, vocab_size)
        )
        _atomic_write_bytes(tok_path, tok.to_str().encode())
    if not ids_path.exists():
        cached = Tokenizer.from_file(str(tok_path))
        ids = encode_documents(cached, documents)
        dtype = np.uint16 if cached.get_vocab_size() < 2**16 else np.int32
        tmp = ids_path.with_name(f".{ids_path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.asarray(ids, dtype=dtype))
        os.replace(tmp, ids_path)
    return tok_path, ids_path


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (micro_batch, seq_len) int64
    targets: torch.Tensor  # (micro_batch, seq_len) int64, inputs shifted by one


class TokenStream:
    """Deterministic training/validation blocks over one token array (last `val_fraction` held out).

    A block is seq_len + 1 consecutive tokens; blocks do not overlap (metaseq's block_size =
    tokens_per_sample + 1, "sample_break_mode none"), so the first token of a block is never a target.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int, val_fraction: float = 0.05) -> None:
        self.block = seq_len + 1
        n_val = max(int(len(tokens) * val_fraction), self.block)
        if len(tokens) - n_val < 2 * self.block:
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len {seq_len}")
        self.train = torch.from_numpy(tokens[:-n_val].astype(np.int64))
        self.val = torch.from_numpy(tokens[-n_val:].astype(np.int64))
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = len(self.train) // self.block

    @lru_cache(maxsize=2)  # noqa: B019 -- one stream per process, two live epochs at most
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(
            self.n_windows, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
        )

    def sequence(self, index: int) -> torch.Tensor:
        """The `index`-th training block of the run (seq_len + 1 tokens)."""
        epoch, offset = divmod(index, self.n_windows)
        start = int(self._permutation(epoch)[offset]) * self.block
        return self.train[start : start + self.block]

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
        """Fixed validation blocks (no shuffling), split across ranks, cycling if the split is small."""
        n = len(self.val) // self.block
        for b in range(n_batches):
            idx = [((b * world + rank) * micro_batch + i) % n for i in range(micro_batch)]
            rows = torch.stack([self.val[j * self.block : (j + 1) * self.block] for j in idx])
            yield Batch(inputs=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())
