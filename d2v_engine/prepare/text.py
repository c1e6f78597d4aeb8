"""`d2v-prepare text`: a folder (or file) of text in, a token folder + report.json out.

    d2v-prepare text SRC OUT [--docs file|paragraphs|lines] [--valid-percent P]
        [--vocab-size 8192 | --tokenizer tokenizer.json] [--min-tokens N] [--errors replace]
        [--no-dedup] [--seed S] [--workers N] [--quiet]
    d2v-prepare text OUT SPLIT=PATH [SPLIT=PATH ...]      (the explicit splits form)

SRC is a folder, read recursively (.txt, .md, .jsonl records' "text" field, and .gz of these), or
one file. A document is, by --docs, a whole file (a .jsonl record), each run of non-blank lines
(paragraphs) or each non-blank line; the default is `file`, `lines` in the explicit form. A
document's text is exactly what it held, decoded from UTF-8: nothing is normalized or stripped,
the separator (the line break, the blank lines) is not part of it. Each document is BPE-encoded,
then </s>, into OUT/<split>.bin, its offsets into OUT/<split>.idx (d2v_engine/data/text.py).

Skipped and counted by reason in OUT/report.json (with the first paths and byte offsets in the
decompressed file; for .jsonl the offset of the record's line):
  not_utf8 (--errors replace keeps the document, invalid bytes as U+FFFD), empty (a file or record
  with no text but white space), duplicate (the same text as an earlier document, by hash;
  --no-dedup keeps it), too_short (fewer than --min-tokens tokens before </s>), corrupt /
  truncated .gz, not_json / no_text_field .jsonl records, too_large (a document or .jsonl line
  over --max-doc-bytes, 64 MiB by default: files and .gz are read as streams, so memory stays
  bounded whatever a file expands to), not_regular_file (a FIFO or device) and unreadable files.
The BPE is trained on the train documents (or --tokenizer is used as given); --valid-percent
holds out that fraction of the documents that pass the byte checks (before --min-tokens), a
seeded draw as audio does. Exit 0 when a document was accepted; exit 2, with report.json and no
token files, when none was.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from d2v_engine.errors import ConfigError, DataError
from d2v_engine.prepare.common import (
    CORRUPT, TOO_SHORT, TRUNCATED, ProgressBar, build_report, check_all, find_files, split_valid,
    write_report,
)

TEXT_EXTENSIONS = tuple(e + gz for e in (".txt", ".md", ".jsonl") for gz in ("", ".gz"))
DOC_MODES = ("file", "paragraphs", "lines")

# Rejection reasons (report.json keys), besides corrupt / truncated / too_short of d2v_engine.prepare.common.
NOT_UTF8 = "not_utf8"
EMPTY = "empty"
DUPLICATE = "duplicate"
NOT_JSON = "not_json"
NO_TEXT_FIELD = "no_text_field"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"  # a document over --max-doc-bytes
NOT_REGULAR = "not_regular_file"  # a FIFO, a device, a socket
MAX_DOC_BYTES = 64 << 20
_BLANK = b" \t\r\f\v"


@dataclass
class Doc:
    """One document that passed the byte checks."""

    path: str  # as the report names it
    offset: int  # byte offset in the (decompressed) file
    text: str
    split: str


# ----------------------------------------------------------------------------------------------
# reading: one file -> its documents and rejections, in file order (runs in the worker pool)


def split_documents(data: bytes, mode: str) -> list[tuple[int, bytes]]:
    """(byte offset, bytes) of each document of `data`: all of it, each run of non-blank lines,
    or each non-blank line; a line ends at \\n (a \\r before it is part of the line break)."""
    if mode == "file":
        return [(0, data)] if data.strip(_BLANK + b"\n") else []
    docs, start, end, pos = [], None, 0, 0
    for line in data.split(b"\n"):
        content = line[:-1] if line.endswith(b"\r") else line
        if content.strip(_BLANK):
            if mode == "lines":
                docs.append((pos, content))
            elif start is None:
                start = pos
            end = pos + len(content)
        elif start is not None:
            docs.append((start, data[start:end]))
            start = None
        pos += len(line) + 1
    if start is not None:
        docs.append((start, data[start:end]))
    return docs


def _decode(raw: bytes, offset: int, errors: str) -> tuple[str | None, int, bool]:
    """(text or None, offset of the first invalid byte, replaced?) of UTF-8 bytes."""
    try:
        return raw.decode("utf-8"), -1, False
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace"), offset + e.start, True
        return None, offset + e.start, False


def _jsonl_texts(data: bytes, errors: str, start: int = 0
                 ) -> list[tuple[int, bytes | None, str | None]]:
    """(line offset, UTF-8 text of the record's "text" field or None, reason or None) of the
    records in `data`, which begins at byte `start` of its file."""
    out, pos = [], start
    for line in data.split(b"\n"):
        offset, pos = pos, pos + len(line) + 1
        if not line.strip(_BLANK):
            continue
        decoded, bad_at, _ = _decode(line, offset, errors)
        if decoded is None:
            out.append((bad_at, None, NOT_UTF8))
            continue
        try:
            record = json.loads(decoded)
        except ValueError:
            out.append((offset, None, NOT_JSON))
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            out.append((offset, None, NO_TEXT_FIELD))
            continue
        try:
            out.append((offset, text.encode("utf-8"), None))
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            if errors != "replace":
                out.append((offset, None, NOT_UTF8))
            else:
                fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                out.append((offset, fixed.encode("utf-8"), None))
    return out


def _lines(stream, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset, the line without its \\n, or None for a line over `limit` bytes) of a binary
    stream, read a line at a time: memory stays bounded by `limit` whatever the stream holds."""
    pos = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            start = pos
            pos += len(line)
            while line and not line.endswith(b"\n"):  # the rest of the long line, unkept
                line = stream.readline(1 << 20)
                pos += len(line)
            yield start, None
            continue
        yield pos, line[:-1] if line.endswith(b"\n") else line
        pos += len(line)


def _line_documents(lines, mode: str, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """split_documents over streamed lines: (offset, document bytes, or None when over limit)."""
    start, parts, size = None, [], 0
    for offset, line in lines:
        content = None if line is None else (line[:-1] if line.endswith(b"\r") else line)
        if content is None or content.strip(_BLANK):
            if mode == "lines":
                yield offset, content
                continue
            if start is None:
                start, parts, size = offset, [], 0
            if parts is not None and content is not None and size + len(line) + 1 <= limit:
                parts.append(line)
                size += len(line) + 1
            else:
                parts = None  # over the limit: the paragraph is rejected once it ends
        elif start is not None:
            yield start, _paragraph(parts)
            start = None
    if start is not None:
        yield start, _paragraph(parts)


def _paragraph(lines: list[bytes] | None) -> bytes | None:
    """The paragraph's bytes as split_documents cuts them: inner line breaks kept, the last
    line's \\r dropped."""
    if lines is None:
        return None
    last = lines[-1][:-1] if lines[-1].endswith(b"\r") else lines[-1]
    return b"\n".join(lines[:-1] + [last])


def _doc_items(docs, errors: str, base: int | None = None) -> list[tuple]:
    """("doc", offset, text, digest, replaced) / ("bad", offset, reason) of each document;
    base: the .jsonl record's offset, which its documents carry."""
    items = []
    for offset, raw in docs:
        at = offset if base is None else base
        if raw is None:
            items.append(("bad", at, TOO_LARGE))
            continue
        text, bad_at, replaced = _decode(raw, at, errors)
        if text is None:
            items.append(("bad", bad_at, NOT_UTF8))
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        items.append(("doc", at, text, digest, replaced))
    return items


def _items(stream, jsonl: bool, mode: str, errors: str, limit: int) -> list[tuple]:
    if jsonl:
        items, records = [], 0
        for offset, line in _lines(stream, limit):
            if line is None:
                items.append(("bad", offset, TOO_LARGE))
                records += 1
                continue
            for base, text_bytes, reason in _jsonl_texts(line, errors, offset):
                records += 1
                if reason is not None:
                    items.append(("bad", base, reason))
                    continue
                docs = split_documents(text_bytes, mode)
                items += _doc_items(docs, errors, base) if docs else [("bad", base, EMPTY)]
        return items if records else [("bad", 0, EMPTY)]
    if mode == "file":
        data = stream.read(limit + 1)
        if len(data) > limit:
            return [("bad", 0, TOO_LARGE)]
        docs = split_documents(data, mode)
    else:
        docs = list(_line_documents(_lines(stream, limit), mode, limit))
    return _doc_items(docs, errors) if docs else [("bad", 0, EMPTY)]


def read_source(job: tuple) -> list[tuple]:
    """Items of one file, in order: ("doc", offset, text, digest, replaced) or
    ("bad", offset, reason). Read as a stream (a .gz decompressed as it is read): memory stays
    bounded by the largest document allowed (--max-doc-bytes), not the file's size."""
    path, mode, errors, limit = job
    name = path.lower()
    gz = name.endswith(".gz")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would never end
            return [("bad", 0, NOT_REGULAR)]
        raw = open(path, "rb")
    except OSError:
        return [("bad", 0, UNREADABLE)]
    with raw:
        try:
            stream = gzip.GzipFile(fileobj=raw) if gz else raw
            return _items(stream, (name[:-3] if gz else name).endswith(".jsonl"), mode, errors,
                          limit)
        except EOFError:
            return [("bad", 0, TRUNCATED)]
        except (gzip.BadGzipFile, zlib.error):
            return [("bad", 0, CORRUPT)]
        except OSError:
            return [("bad", 0, CORRUPT if gz else UNREADABLE)]


# ----------------------------------------------------------------------------------------------
# the command


def _split_arg(text: str) -> tuple[str, str] | None:
    name, sep, path = text.partition("=")
    return (name, path) if sep and name.isidentifier() and path else None


def _sources(args) -> tuple[list[tuple[str, str, str]], bool, str]:
    """([(split, path to read, path to report)], explicit form?, description of the source)."""
    positional = args.paths
    splits = [_split_arg(p) for p in positional[1:]]
    if len(positional) >= 2 and all(splits):
        if args.valid_percent:
            raise ConfigError("--valid-percent draws the valid split from SRC; with explicit "
                              "SPLIT=PATH arguments give valid=PATH instead")
        names = [name for name, _ in splits]
        if len(set(names)) != len(names):
            raise ConfigError(f"each split may be given once, got {names}")
        args.out = positional[0]
        found = []
        for name, path in splits:
            found += [(name, read, shown) for read, shown in _files_of(Path(path), shown=path)]
        return found, True, json.dumps(dict(splits))
    if len(positional) != 2:
        raise ConfigError(f"expected SRC OUT (a text folder or file, then the output folder) or "
                          f"OUT SPLIT=PATH ..., got {' '.join(positional)}")
    src, args.out = positional
    return [("train", read, shown) for read, shown in _files_of(Path(src))], False, src


def _files_of(src: Path, shown: str | None = None) -> list[tuple[str, str]]:
    """(path to read, path for the report) of a source file, or of a folder's text files."""
    if src.is_dir():
        files = find_files(src, TEXT_EXTENSIONS)
        if not files:
            raise DataError(f"{src}: no {'/'.join(TEXT_EXTENSIONS)} file in this folder")
        prefix = f"{shown}/" if shown else ""
        return [(str(src / rel), prefix + rel) for rel in files]
    if not src.is_file():
        raise DataError(f"text source not found: {src}")
    return [(str(src), shown or src.name)]


def _load_tokenizer(path: Path):
    """A given tokenizer.json, checked to define the five special tokens."""
    from tokenizers import Tokenizer

    from d2v_engine.data.tokenize import special_ids

    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({reason})") from None
    try:
        special_ids(tokenizer)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return tokenizer


def prepare_text(args) -> int:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise DataError("d2v-prepare text needs the `tokenizers` package: pip install "
                        "tokenizers (or pip install -e '.[text]')") from None
    from d2v_engine.data import tokenize as tok

    sources, explicit, described = _sources(args)
    mode = args.docs or ("lines" if explicit else "file")
    out = Path(args.out).resolve()
    if args.tokenizer is None and args.vocab_size < 300:
        raise ConfigError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs >= 300 ids "
                          "(256 bytes + specials + merges)")
    tokenizer = _load_tokenizer(Path(args.tokenizer)) if args.tokenizer is not None else None

    # 1. read and check the bytes of every file (all cores)
    jobs = [(read, mode, args.errors, args.max_doc_bytes) for _, read, _ in sources]
    results = check_all(read_source, jobs, args.workers, "reading text", not args.quiet)
    docs, rejected, seen, replaced = [], [], set(), 0
    for (split, _, shown), items in zip(sources, results):
        for item in items:
            if item[0] == "bad":
                rejected.append((shown, item[2], item[1]))
            elif args.dedup and item[3] in seen:
                rejected.append((shown, DUPLICATE, item[1]))
            else:
                seen.add(item[3])
                replaced += item[4]
                docs.append(Doc(shown, item[1], item[2], split))
    if not explicit:
        for doc, held_out in zip(docs, split_valid(len(docs), args.valid_percent, args.seed)):
            doc.split = "valid" if held_out else "train"
    split_names = list(dict.fromkeys(split for split, _, _ in sources)) if explicit else [
        "train", "valid"]

    # 2. the tokenizer: trained on the train documents, or the given one
    train_texts = [d.text for d in docs if d.split == split_names[0]]
    if tokenizer is None and train_texts:
        print(f"training a byte-level BPE of {args.vocab_size} ids on {len(train_texts)} "
              "documents", file=sys.stderr)
        tokenizer = tok.train_bpe(train_texts, args.vocab_size,
                                  show_progress=not args.quiet and sys.stderr.isatty())
    ids = tok.special_ids(tokenizer) if tokenizer is not None else None

    # 3. encode; too short documents are rejected
    encoded = []
    if docs and tokenizer is not None:
        encoded = tok.encode_documents(tokenizer, [d.text for d in docs],
                                       ProgressBar(len(docs), "tokenizing", not args.quiet,
                                                   unit="documents"))
    kept = []
    for doc, ids_ in zip(docs, encoded):
        if len(ids_) < args.min_tokens:
            rejected.append((doc.path, TOO_SHORT, doc.offset))
        else:
            kept.append((doc, ids_))
    rank = {shown: i for i, (_, _, shown) in enumerate(sources)}
    rejected.sort(key=lambda r: (rank[r[0]], r[2]))  # scan order, then the offset in a file

    # 4. write: the token files of each split, meta.json, report.json
    stale = ["meta.json", "tokenizer.json"] + [f"{s}.{ext}" for s in split_names
                                                for ext in ("bin", "idx", "label")]
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    lengths = [len(ids_) + 1 for _, ids_ in kept]  # the document's span in <split>.bin
    report = build_report(len(kept), rejected, lengths, total_tokens=int(sum(lengths)))
    report["docs"] = mode
    if replaced:
        report["replaced_invalid_utf8"] = replaced
    if docs and not any(doc.split == split_names[0] for doc, _ in kept):
        report["accepted"] = 0  # nothing is written without the first split
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        raise DataError(f"no document of split '{split_names[0]}' was accepted (it trains the "
                        f"BPE and is what data.path reads); details in {out / 'report.json'}")
    if kept:
        vocab = tokenizer.get_vocab_size()
        dtype = tok.token_dtype(vocab)
        tokenizer.save(str(out / "tokenizer.json"))
        source = (f"given {Path(args.tokenizer).name}" if args.tokenizer is not None
                  else f"byte-level BPE trained on {split_names[0]}")
        num_tokens, num_docs = {}, {}
        for split in split_names:
            part = [ids_ for doc, ids_ in kept if doc.split == split]
            if part:
                num_tokens[split] = tok.write_tokens(out, split, part, ids["eos"], dtype)
                num_docs[split] = len(part)
        meta = {"vocab_size": vocab, **ids, "dtype": dtype, "num_tokens": num_tokens,
                "num_docs": num_docs, "tokenizer": f"tokenizer.json ({source})",
                "source": described, "docs": mode}
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        report["splits"] = {s: {"documents": num_docs[s], "tokens": num_tokens[s]}
                            for s in num_docs}
        report["tokenizer"] = ({"trained": True, "vocab_size": vocab} if args.tokenizer is None
                               else {"file": str(Path(args.tokenizer).resolve()),
                                     "vocab_size": vocab})
    return write_report(out, report, what="document")


def add_arguments(p) -> None:
    """The text sub-command's options (d2v-prepare text and its alias d2v_engine.cli.tokenize)."""
    from d2v_engine.prepare.common import default_workers, fraction_arg, positive_int_arg

    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SRC OUT: a text folder (recursive: .txt .md .jsonl, and .gz of these) "
                        "or file, then the output folder; or OUT SPLIT=PATH ...: the output "
                        "folder, then a file or folder per split (the first trains the BPE)")
    p.add_argument("--docs", default=None, choices=DOC_MODES,
                   help="what one document is: a file (a .jsonl record), a run of non-blank "
                        "lines, or a line (default: file; lines with SPLIT=PATH)")
    p.add_argument("--valid-percent", type=fraction_arg, default=0.0,
                   help="fraction of the documents held out in valid.bin (0.01 = 1 %%)")
    p.add_argument("--seed", type=int, default=42, help="seed of the valid draw")
    p.add_argument("--vocab-size", type=int, default=8192, help="ids of the trained BPE")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.json instead of "
                   "training one (must define <s> <pad> </s> <unk> <mask>)")
    p.add_argument("--min-tokens", type=int, default=1,
                   help="documents with fewer tokens (before </s>) are rejected as too_short")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: reject the document (strict) or keep it with U+FFFD")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="reject exact duplicate documents (by hash; default on)")
    p.add_argument("--max-doc-bytes", type=positive_int_arg, default=MAX_DOC_BYTES,
                   help="documents (and .jsonl lines) over this many bytes are rejected as "
                        "too_large (default 64 MiB); memory per reading process stays below it")
    p.add_argument("--workers", type=positive_int_arg, default=default_workers(),
                   help="reading processes (default: the usable cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
