"""Pre-tokenized text dataset: a memory-mapped token stream cut into samples as fairseq does.

A text folder holds `meta.json` (vocab_size and the special ids bos, pad, eos, unk, mask) and, per
split, `<split>.bin` (uint16 little-endian tokens, every document followed by </s>) with
`<split>.idx` (int64 document offsets into .bin, n_docs + 1 of them: the document boundaries).
Without labels a sample is <s> + a block of at most data.max_tokens - 1 tokens of the stream,
as fairseq's masked_lm task builds it (TokenBlockDataset of tokens_per_sample - 1, then <s>
prepended; no </s> is added: a block holds the </s> of the documents it ends).
data.sample_break_mode picks the blocks:
  none          consecutive blocks of the whole stream, across documents, all full but the last;
  complete_doc  blocks inside one document: a document is one block, or, when longer than a
                block, consecutive full blocks and its remainder. Samples shorter than
                max_tokens are padded by collate and masked out by the model (padding_mask).
Either way every token of the split is in exactly one block.
fairseq's complete_doc packs whole sentences of one document; our unit inside a document is its
text as one run of tokens (newlines are tokens, not sentence ends), so a long document is cut
every max_tokens - 1 tokens, where fairseq would emit an over-long sentence as its own block.
With `<split>.label` (one integer per document) each document is one sample, <s> + document
truncated to data.max_tokens - 2 + </s>, with its label (the linear-probe set).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from d2v_engine.config import DataConfig
from d2v_engine.data.common import with_labels, read_labels
from d2v_engine.errors import ConfigError, DataError

SPECIAL_KEYS = ("bos", "pad", "eos", "unk", "mask")


def read_meta(folder: Path) -> dict:
    """meta.json of a text folder, with vocab_size and every special id checked to be an int."""
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(f"text folder {folder} has no meta.json (vocab_size and special ids)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{path}: 'vocab_size' must be a positive integer")
    for key in SPECIAL_KEYS:
        if not isinstance(meta.get(key), int) or not 0 <= meta[key] < vocab:
            raise DataError(f"{path}: '{key}' must be an integer id below vocab_size={vocab}")
    dtype = meta.setdefault("dtype", "uint16")
    if dtype not in TOKEN_DTYPES or vocab > np.iinfo(dtype).max + 1:
        raise DataError(f"{path}: 'dtype' {dtype!r} must be 'uint16' or 'uint32' and hold "
                        f"vocab_size={vocab}")
    return meta


TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}


def read_token_stream(folder: Path, split: str, dtype: str = "uint16"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens: N memory-mapped ids, offsets: n_docs + 1 int64) of one split, checked to agree."""
    bin_path, idx_path = folder / f"{split}.bin", folder / f"{split}.idx"
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise DataError(f"text split '{split}' missing: {path} not found")
    width = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if bin_path.stat().st_size == 0 or bin_path.stat().st_size % width:
        raise DataError(f"{bin_path}: expected a non-empty stream of {dtype} tokens")
    tokens = np.memmap(bin_path, dtype=TOKEN_DTYPES[dtype], mode="r")
    offsets = np.fromfile(idx_path, dtype="<i8")
    if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) < 0)):
        raise DataError(f"{idx_path}: expected increasing int64 offsets from 0 to {len(tokens)}")
    return tokens, offsets


def block_spans(offsets: np.ndarray, block: int, mode: str) -> np.ndarray:
    """n x 2 int64 [start, end) token ranges of the samples' blocks, in stream order; offsets:
    n_docs + 1 document offsets, block: tokens per block (max_tokens - 1), mode as above."""
    total = int(offsets[-1])
    if mode == "none":
        starts = np.arange(0, total, block, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + block, total)], axis=1)
    if mode != "complete_doc":
        raise ConfigError(f"config key 'data.sample_break_mode': {mode!r}; expected 'none' or "
                          "'complete_doc'")
    lengths = np.diff(offsets)
    count = -(-lengths // block)  # blocks per document: 0 for an empty one
    doc = np.repeat(np.arange(len(lengths)), count)
    first = np.cumsum(count) - count  # index of each document's first block
    starts = offsets[:-1][doc] + (np.arange(len(doc)) - first[doc]) * block
    return np.stack([starts, np.minimum(starts + block, offsets[1:][doc])], axis=1).astype(np.int64)


def document_lengths(tokens: np.ndarray, offsets: np.ndarray, eos: int) -> np.ndarray:
    """Tokens per document without its closing </s> (int64, n_docs)."""
    lengths = np.diff(offsets)
    ends = offsets[1:][lengths > 0] - 1
    lengths[lengths > 0] -= np.asarray(tokens[ends]) == eos
    return lengths


class TokenDataset:
    """Token blocks (or labelled documents) of one split; load() -> {"source": T int64}."""

    def __init__(self, data_cfg: DataConfig, folder: Path, split: str):
        if data_cfg.max_tokens < 3:
            raise ConfigError("config key 'data.max_tokens': must be >= 3 (<s>, a token, </s>)")
        self.cfg = data_cfg
        self.folder, self.split = Path(folder), split
        if not self.folder.is_dir():
            raise DataError(f"text folder not found: {self.folder}")
        meta = read_meta(self.folder)
        self.vocab_size = meta["vocab_size"]
        self.special_ids = {key: meta[key] for key in SPECIAL_KEYS}
        self.tokens, self.offsets = read_token_stream(self.folder, split, meta["dtype"])
        label_file = self.folder / f"{split}.label"
        self.labels = None
        self.num_labels = 0
        if label_file.is_file():
            num_docs = len(self.offsets) - 1
            self.labels = read_labels(label_file, num_docs, self.folder / f"{split}.idx")
            self.num_labels = max(self.labels) + 1
        self.mode = data_cfg.sample_break_mode
        if self.labels is not None:
            self.block = data_cfg.max_tokens - 2
            self.spans = None
            body = np.minimum(document_lengths(self.tokens, self.offsets, self.special_ids["eos"]),
                              self.block)
            self.sizes = body + 2
        else:
            self.block = data_cfg.max_tokens - 1
            self.spans = block_spans(self.offsets, self.block, self.mode)
            self.sizes = self.spans[:, 1] - self.spans[:, 0] + 1

    def __len__(self) -> int:
        return len(self.sizes)

    def body(self, index: int) -> np.ndarray:
        """The token-file ids of sample `index`, without the <s> (and </s>) that load() adds."""
        if self.labels is None:
            start, end = self.spans[index]
            return self.tokens[start:end]
        doc = self.tokens[self.offsets[index]:self.offsets[index + 1]]
        if len(doc) and doc[-1] == self.special_ids["eos"]:
            doc = doc[:-1]
        return doc[:self.block]

    def load(self, index: int, rng: np.random.Generator) -> dict:
        """Sample `index`: "source" T int64, T <= data.max_tokens: <s> + block, or, labelled,
        <s> + document + </s> (+ "label" int)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range 0..{len(self) - 1}")
        body = self.body(index)
        labelled = self.labels is not None
        ids = np.empty(len(body) + 1 + labelled, dtype=np.int64)
        ids[0], ids[1:len(body) + 1] = self.special_ids["bos"], body
        if labelled:
            ids[-1] = self.special_ids["eos"]
        sample = {"source": torch.from_numpy(ids)}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        return sample

    def collate(self, samples: list[dict], rng: np.random.Generator | None = None) -> dict:
        """Pads with the pad id: "source" B x T int64, "padding_mask" B x T bool (True = pad)."""
        assert samples, "collate needs at least one sample"
        length = max(s["source"].numel() for s in samples)
        source = torch.full((len(samples), length), self.special_ids["pad"], dtype=torch.int64)
        padding_mask = torch.ones(len(samples), length, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s["source"].numel()
            source[i, :n] = s["source"]
            padding_mask[i, :n] = False
        batch = {"source": source, "padding_mask": padding_mask}
        return with_labels(batch, samples)

    def describe(self) -> str:
        """One line: folder, split, token and sample counts."""
        kind = (f"{len(self)} labelled documents ({self.num_labels} labels)"
                if self.labels is not None
                else f"{len(self)} blocks (sample_break_mode={self.mode})")
        return (f"text {self.folder} [{self.split}]: {len(self.tokens)} tokens, {kind} of <= "
                f"{self.cfg.max_tokens} tokens, vocab {self.vocab_size}")
