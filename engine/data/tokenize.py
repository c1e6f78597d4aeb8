"""Plain text -> the token folder engine.data.text reads (meta.json, <split>.bin, <split>.idx).

    python -m engine.data.tokenize OUT train=corpus.txt [valid=held_out.txt ...]
        [--vocab-size 8192 | --tokenizer tokenizer.json] [--docs lines|paragraphs]

Documents are the lines of each file (or its blank-line separated paragraphs); every document is
BPE-encoded by Hugging Face `tokenizers` and followed by </s> in <split>.bin (uint16 LE, or uint32
when the vocabulary exceeds 65,536 ids: meta.json "dtype"); <split>.idx holds the int64 document
offsets. Without --tokenizer a byte-level BPE is trained on the first split, with the RoBERTa
special ids <s>=0 <pad>=1 </s>=2 <unk>=3 and <mask> = the last id; a given tokenizer.json must
define those five tokens. Either way OUT/tokenizer.json is the tokenizer that made the files.
`main(argv)` is the whole command, for other entry points to reuse.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, DataError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as RoBERTa / fairseq
MASK = "<mask>"
SPECIAL_KEYS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": MASK}


def train_bpe(docs: list[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) of at most vocab_size ids trained on docs
    (fewer when the corpus has fewer merges to learn), specials at 0..3 and <mask> last."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size - 1, min_frequency=min_frequency,
                            special_tokens=list(SPECIALS))
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


def write_split(folder: Path, split: str, tokenizer, docs: list[str], eos: int,
                dtype: str = "uint16") -> tuple[int, int]:
    """<split>.bin (every document then </s>) and <split>.idx; returns (tokens, documents)."""
    encoded = [e.ids + [eos] for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    little = "<u2" if dtype == "uint16" else "<u4"
    flat = np.fromiter((t for e in encoded for t in e), dtype=little, count=int(offsets[-1]))
    flat.tofile(folder / f"{split}.bin")
    offsets.tofile(folder / f"{split}.idx")
    return int(offsets[-1]), len(encoded)


def read_documents(path: Path, docs: str) -> list[str]:
    """Non-empty lines, or blank-line separated paragraphs, of a UTF-8 text file."""
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    parts = text.split("\n\n") if docs == "paragraphs" else text.splitlines()
    found = [p.strip("\n") for p in parts if p.strip()]
    if not found:
        raise DataError(f"{path}: no text")
    return found


def tokenize(out: Path, splits: dict[str, Path], vocab_size: int = 8192,
             tokenizer_file: Path | None = None, docs: str = "lines") -> dict:
    """Writes the token folder `out` from {split: text file}; returns its meta.json content."""
    texts = {split: read_documents(path, docs) for split, path in splits.items()}
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        if not Path(tokenizer_file).is_file():
            raise DataError(f"tokenizer file not found: {tokenizer_file}")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        source = f"given {Path(tokenizer_file).name}"
    else:
        if vocab_size < 300:
            raise ConfigError(f"--vocab-size {vocab_size}: a byte-level BPE needs >= 300 ids "
                              "(256 bytes + specials + merges)")
        first = next(iter(texts))
        tokenizer = train_bpe(texts[first], vocab_size)
        source = f"byte-level BPE trained on {first}"
    ids = special_ids(tokenizer)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    num_tokens, num_docs = {}, {}
    for split, split_docs in texts.items():
        num_tokens[split], num_docs[split] = write_split(out, split, tokenizer, split_docs,
                                                         ids["eos"], dtype)
    meta = {"vocab_size": vocab, **ids, "dtype": dtype, "num_tokens": num_tokens,
            "num_docs": num_docs, "tokenizer": f"tokenizer.json ({source})",
            "source": {split: str(path) for split, path in splits.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _split_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.isidentifier() or not path:
        raise argparse.ArgumentTypeError(f"expected SPLIT=FILE (e.g. train=corpus.txt), got {text!r}")
    return name, Path(path)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (meta.json, <split>.bin/.idx)")
    parser.add_argument("splits", nargs="+", type=_split_arg, metavar="SPLIT=FILE",
                        help="plain-text file per split; the first trains the BPE")
    parser.add_argument("--vocab-size", type=int, default=8192, help="ids of the trained BPE")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="an existing tokenizer.json instead of training one")
    parser.add_argument("--docs", choices=["lines", "paragraphs"], default="lines",
                        help="what one document is (default: a line)")
    return parser


def main(argv=None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    splits = dict(args.splits)
    if len(splits) != len(args.splits):
        raise SystemExit("each split may be given once")
    meta = tokenize(args.out, splits, args.vocab_size, args.tokenizer, args.docs)
    print(f"tokenized into {args.out}: vocab {meta['vocab_size']}, tokens {meta['num_tokens']}, "
          f"documents {meta['num_docs']}")
    return meta


if __name__ == "__main__":
    try:
        main()
    except (DataError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
