"""Text -> the token folder d2v_engine.data.text reads: the BPE tokenizer and the token-file writer.

    python -m d2v_engine.cli.tokenize SRC OUT [options]        (the same command as
    python -m d2v_engine.cli.tokenize OUT SPLIT=PATH ...        `d2v-prepare text`)

Every document is BPE-encoded by Hugging Face `tokenizers` and followed by </s> in <split>.bin
(uint16 LE, or uint32 when the vocabulary exceeds 65,536 ids: meta.json "dtype"); <split>.idx
holds the int64 document offsets, n_docs + 1 of them, which are the document boundaries that
data.sample_break_mode=complete_doc keeps. Without --tokenizer a byte-level BPE is trained on the
train documents, with the RoBERTa special ids <s>=0 <pad>=1 </s>=2 <unk>=3 and <mask> = the last
id; a given tokenizer.json must define those five tokens. Either way OUT/tokenizer.json is the
tokenizer that made the files. Text that spells a special token ("</s>") is encoded as text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2v_engine.errors import DataError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as RoBERTa / fairseq
MASK = "<mask>"
SPECIAL_KEYS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": MASK}
_ENCODE_CHUNK = 4096  # documents per encode_batch call (one progress step)


def train_bpe(docs: list[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) of at most vocab_size ids trained on docs
    (fewer when the corpus has fewer merges to learn), specials at 0..3 and <mask> last."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size - 1, min_frequency=min_frequency,
                            special_tokens=list(SPECIALS), show_progress=show_progress)
    bpe.add_special_tokens([AddedToken(MASK, lstrip=True)])
    ids = [bpe.token_to_id(t) for t in (*SPECIALS, MASK)]
    if ids != [0, 1, 2, 3, bpe.get_vocab_size() - 1]:
        raise DataError(f"BPE training gave unexpected special ids {ids}")
    # Only for people loading tokenizer.json elsewhere: our .bin files are encoded without it.
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return bpe._tokenizer


def special_ids(tokenizer) -> dict:
    """{"bos", "pad", "eos", "unk", "mask"} -> id; DataError naming any token the tokenizer lacks."""
    ids = {key: tokenizer.token_to_id(token) for key, token in SPECIAL_KEYS.items()}
    missing = [SPECIAL_KEYS[k] for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"tokenizer lacks the special tokens {missing} (needs {list(SPECIAL_KEYS.values())})")
    return ids


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_documents(tokenizer, docs: list[str], progress=None) -> list[np.ndarray]:
    """The ids of each document (uint32 arrays), no specials added; a special token's spelling
    inside the text ("</s>", "<mask>") is encoded as text, so only the format's </s> ends a
    document. `progress`: a ProgressBar updated per chunk of documents."""
    was = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        out = []
        for i in range(0, len(docs), _ENCODE_CHUNK):
            batch = tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK], add_special_tokens=False)
            out += [np.asarray(e.ids, dtype=np.uint32) for e in batch]
            if progress is not None:
                progress.update(len(out))
        return out
    finally:
        tokenizer.encode_special_tokens = was


def write_tokens(folder: Path, split: str, encoded: list[np.ndarray], eos: int,
                 dtype: str = "uint16") -> int:
    """<split>.bin (every document then </s>) and <split>.idx; returns the tokens written."""
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    offsets[1:] = np.cumsum(lengths + 1)
    little = "<u2" if dtype == "uint16" else "<u4"
    ids = np.concatenate(encoded).astype(little) if encoded else np.zeros(0, little)
    flat = np.insert(ids, np.cumsum(lengths), eos)  # </s> after each document
    flat.tofile(folder / f"{split}.bin")
    offsets.tofile(folder / f"{split}.idx")
    return int(offsets[-1])


def write_split(folder: Path, split: str, tokenizer, docs: list[str], eos: int,
                dtype: str = "uint16") -> tuple[int, int]:
    """Encodes docs into <split>.bin / <split>.idx; returns (tokens, documents)."""
    return write_tokens(folder, split, encode_documents(tokenizer, docs), eos, dtype), len(docs)
