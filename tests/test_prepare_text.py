"""d2v-prepare text on planted folders: every good document kept exactly, every bad one counted
by reason, one-line errors with exit 2 from every entry point, and the token folder trains with
complete_doc blocks whose padding changes nothing."""
import copy
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

Tokenizer = pytest.importorskip("tokenizers").Tokenizer

from d2v_engine.config import DataConfig, load_config
from d2v_engine.data import build_dataset
from d2v_engine.objective import build_objective
from d2v_engine.models import build_model
from d2v_engine.cli.prepare import main

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_TOKENIZER = ROOT / "data" / "text" / "tokenizer.json"
QUICK = ["--workers", "1", "--quiet", "--vocab-size", "320"]

A_TEXT = ("The first document: a line,\nanother line with\r\nWindows line ends and\ttabs.\n\n"
          "Its second paragraph spells </s> and <mask> as text.\n")
GOOD = {  # path -> the exact text of its one document (--docs file)
    "a.txt": A_TEXT,
    "notes/b.md": "# Title\n\nUnicode kept as is: héllo wörld, naïve café ✓, 日本語.\n",
    "notes/deep/c.txt": "  leading spaces and a trailing blank line stay  \n\n",
    "d.txt.gz": "A gzipped document about compression ratios.\n",
}
JSONL_GOOD = ["first jsonl record", "second jsonl record\nwith two lines"]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def planted(tmp_path):
    src = tmp_path / "corpus"
    for rel, text in GOOD.items():
        raw = text.encode()
        _write(src / rel, gzip.compress(raw) if rel.endswith(".gz") else raw)
    records = [json.dumps({"text": JSONL_GOOD[0], "id": 1}), "{not json",
               json.dumps({"title": "no text field"}), json.dumps({"text": JSONL_GOOD[1]})]
    _write(src / "e.jsonl", ("\n".join(records) + "\n").encode())
    _write(src / "bad" / "latin1.txt", "caf\xe9 in Latin-1\n".encode("latin-1"))  # byte 3
    _write(src / "bad" / "empty.txt", b"")
    _write(src / "bad" / "blank.md", b"  \n\t\n")
    _write(src / "bad" / "copy.txt", A_TEXT.encode())  # duplicate of a.txt
    _write(src / "bad" / "cut.txt.gz", gzip.compress(b"truncated gzip " * 50)[:30])
    _write(src / "bad" / "junk.md.gz", b"not gzip data at all")
    _write(src / "ignored.pdf", b"%PDF not a text extension")
    return src


def _documents(out: Path, split: str = "train") -> list[str]:
    """The decoded text of every document of a prepared split, in file order."""
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype="<u2")
    offsets = np.fromfile(out / f"{split}.idx", dtype="<i8")
    docs = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        assert ids[end - 1] == meta["eos"], "every document ends with </s>"
        docs.append(tok.decode(ids[start:end - 1].tolist(), skip_special_tokens=False))
    return docs


def test_planted_folder_keeps_every_good_document_exactly_and_counts_every_bad_one(planted,
                                                                                   tmp_path):
    out = tmp_path / "out"
    assert main(["text", str(planted), str(out), *QUICK]) == 0
    assert _documents(out) == [GOOD["a.txt"], GOOD["d.txt.gz"], *JSONL_GOOD,
                               GOOD["notes/b.md"], GOOD["notes/deep/c.txt"]]
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 6 and report["docs"] == "file"
    assert report["rejected"] == {"corrupt": 1, "duplicate": 1, "empty": 2, "no_text_field": 1,
                                  "not_json": 1, "not_utf8": 1, "truncated": 1}, report["rejected"]
    records = "\n".join([json.dumps({"text": JSONL_GOOD[0], "id": 1}), "{not json", ""])
    assert report["rejected_files"] == [  # scan order: a folder's files, then its sub-folders
        {"path": "e.jsonl", "reason": "not_json", "offset": len(records.split("\n")[0]) + 1},
        {"path": "e.jsonl", "reason": "no_text_field", "offset": len(records)},
        {"path": "bad/blank.md", "reason": "empty", "offset": 0},
        {"path": "bad/copy.txt", "reason": "duplicate", "offset": 0},
        {"path": "bad/cut.txt.gz", "reason": "truncated", "offset": 0},
        {"path": "bad/empty.txt", "reason": "empty", "offset": 0},
        {"path": "bad/junk.md.gz", "reason": "corrupt", "offset": 0},
        {"path": "bad/latin1.txt", "reason": "not_utf8", "offset": 3},
    ], report["rejected_files"]
    lengths = np.diff(np.fromfile(out / "train.idx", dtype="<i8"))
    assert report["total_tokens"] == int(lengths.sum()) == (out / "train.bin").stat().st_size // 2
    assert report["lengths"] == {"min": float(lengths.min()), "p50": float(np.median(lengths)),
                                 "p95": float(np.percentile(lengths, 95)),
                                 "max": float(lengths.max())}
    meta = json.loads((out / "meta.json").read_text())
    assert report["tokenizer"] == {"trained": True, "vocab_size": meta["vocab_size"]}
    assert report["splits"] == {"train": {"documents": 6, "tokens": report["total_tokens"]}}
    assert not (out / "valid.bin").exists()


def test_lines_and_paragraphs_are_the_exact_text_between_separators(tmp_path):
    src = tmp_path / "one.txt"
    src.write_bytes(b"  first line  \r\nsecond line\n \t\n\nthird\r\nfourth\n\nfifth")
    out = tmp_path / "o"
    assert main(["text", str(src), str(out / "lines"), "--docs", "lines", *QUICK]) == 0
    assert _documents(out / "lines") == ["  first line  ", "second line", "third", "fourth",
                                         "fifth"]
    assert main(["text", str(src), str(out / "par"), "--docs", "paragraphs", *QUICK]) == 0
    assert _documents(out / "par") == ["  first line  \r\nsecond line", "third\r\nfourth",
                                       "fifth"]


def test_errors_replace_keeps_invalid_bytes_as_the_replacement_character(tmp_path):
    src = tmp_path / "c"
    _write(src / "bad.txt", b"caf\xe9 ok\n")
    _write(src / "good.txt", b"fine text\n")
    assert main(["text", str(src), str(tmp_path / "o"), "--errors", "replace", *QUICK]) == 0
    assert _documents(tmp_path / "o") == ["caf\ufffd ok\n", "fine text\n"]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["accepted"] == 2 and report["rejected"] == {}
    assert report["replaced_invalid_utf8"] == 1


def test_min_tokens_and_no_dedup(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("a\nthe same line of several words\nthe same line of several words\n")
    tok = ["--tokenizer", str(EMBEDDED_TOKENIZER), "--docs", "lines", "--workers", "1", "--quiet"]
    assert main(["text", str(src), str(tmp_path / "o1"), *tok, "--min-tokens", "3"]) == 0
    report = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert report["accepted"] == 1 and report["rejected"] == {"duplicate": 1, "too_short": 1}
    assert report["rejected_files"][0] == {"path": "c.txt", "reason": "too_short", "offset": 0}
    assert report["tokenizer"] == {"file": str(EMBEDDED_TOKENIZER), "vocab_size": 4096}
    assert main(["text", str(src), str(tmp_path / "o2"), *tok, "--no-dedup"]) == 0
    assert _documents(tmp_path / "o2") == ["a"] + ["the same line of several words"] * 2


def test_valid_percent_holds_out_a_seeded_fraction_of_documents(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("".join(f"document number {i} of the corpus\n" for i in range(40)))
    args = ["--docs", "lines", "--valid-percent", "0.1", *QUICK]
    assert main(["text", str(src), str(tmp_path / "a"), *args]) == 0
    assert main(["text", str(src), str(tmp_path / "b"), *args]) == 0
    train, valid = _documents(tmp_path / "a"), _documents(tmp_path / "a", "valid")
    assert len(valid) == 4 and len(train) == 36
    assert sorted(train + valid) == sorted(f"document number {i} of the corpus" for i in range(40))
    assert valid == _documents(tmp_path / "b", "valid"), "the draw is seeded"
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["num_docs"] == {"train": 36, "valid": 4}


def test_explicit_splits_form_still_works(tmp_path):
    (tmp_path / "t.txt").write_text("train line one\ntrain line two\n")
    (tmp_path / "v.txt").write_text("valid line\n")
    out = tmp_path / "o"
    assert main(["text", str(out), f"train={tmp_path / 't.txt'}", f"valid={tmp_path / 'v.txt'}",
                 *QUICK]) == 0
    assert _documents(out) == ["train line one", "train line two"]  # lines by default here
    assert _documents(out, "valid") == ["valid line"]


def test_nothing_accepted_exits_2_with_counts_and_no_token_files(tmp_path, capsys):
    src = tmp_path / "bad"
    _write(src / "x.txt", b"\xff\xfe\xfd")
    _write(src / "y.md", b"")
    out = tmp_path / "out"
    _write(out / "meta.json", b"{}")  # an earlier preparation's files must not survive
    _write(out / "train.bin", b"\0\0")
    assert main(["text", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no document accepted" in err and "not_utf8 1" in err, err
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 0 and report["rejected"] == {"empty": 1, "not_utf8": 1}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def _run(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_command_line_exits_0_on_success_and_2_with_one_line_on_a_missing_input(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("one small document of text\n")
    ok = _run("d2v_engine.cli.prepare", "text", str(good), str(tmp_path / "ok"), *QUICK)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    bad = _run("d2v_engine.cli.tokenize", str(tmp_path / "o"), f"train={tmp_path / 'nope.txt'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "nope.txt" in bad.stderr, bad.stderr


def test_every_entry_point_answers_bad_input_with_one_line_and_exit_2(tmp_path, capsys):
    from d2v_engine.cli.tokenize import main as tokenize_main

    good = tmp_path / "good.txt"
    good.write_text("one small document of text\n")
    bad_tok = tmp_path / "tokenizer.json"
    bad_tok.write_text("{ this is not a tokenizer")
    missing, out = str(tmp_path / "missing"), str(tmp_path / "o")
    cases = [  # (entry point, argv, what the error line must name)
        (main, ["text", missing, out], "missing"),
        (main, ["text", str(good), out, "--tokenizer", str(bad_tok)], "tokenizer.json"),
        (main, ["text", str(good), out, "--vocab-size", "10"], "--vocab-size"),
        (main, ["text", str(good), str(good)], "good.txt"),  # OUT is a file
        (main, ["text", str(good), out, "--valid-percent", "5"], "--valid-percent"),
        (main, ["text", out, f"train={good}", "--valid-percent", "0.1"], "--valid-percent"),
        (main, ["text", "a", "b", "c"], "SRC OUT"),
        (main, ["audio", missing, out], "missing"),
        (main, ["image", missing, out], "missing"),
        (tokenize_main, [out, f"train={tmp_path / 'nope.txt'}"], "nope.txt"),
        (tokenize_main, [out, f"train={good}", "--docs", "words"], "--docs"),
        (tokenize_main, [out, f"train={good}", "train=x.txt"], "train"),
    ]
    for entry, argv, named in cases:
        assert entry(argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and named in errors[0], (argv, err)
    assert tokenize_main(["--help"]) == 0 and main(["text", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "python -m d2v_engine.cli.tokenize SRC OUT_DIR" in usage, usage
    assert "tokenize.py" not in usage and "prepare.py" not in usage, usage


def test_jsonl_lone_surrogate_is_not_utf8(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok record"}\n{"text": "bad \\ud800 record"}\n')
    assert main(["text", str(src), str(tmp_path / "o"), *QUICK]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["rejected_files"] == [{"path": "c.jsonl", "reason": "not_utf8", "offset": 22}]


# ---------------------------------------------------------------------- into training


def test_prepared_folder_trains_with_complete_doc_blocks(planted, tmp_path, monkeypatch):
    from d2v_engine.run.trainer import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as tests/test_train.py: kernels tested apart
    out = tmp_path / "tok"
    assert main(["text", str(planted), str(out), "--docs", "paragraphs", "--tokenizer",
                 str(EMBEDDED_TOKENIZER), "--workers", "1", "--quiet"]) == 0
    data = build_dataset(DataConfig(path=str(out), max_tokens=16,
                                    sample_break_mode="complete_doc"), "text")
    offsets = data.offsets
    doc = np.searchsorted(offsets, data.spans[:, 0], side="right") - 1
    assert np.all(data.spans[:, 1] <= offsets[doc + 1]), "a block never crosses a document end"
    cfg = load_config(ROOT / "configs/tiny_text.yaml", [
        f"data.path={out}", "data.max_tokens=16", "data.sample_break_mode=complete_doc",
        f"run.dir={tmp_path / 'run'}", "train.progress=false", "train.max_steps=3",
        "train.log_every=1",
        "train.global_batch=4", "train.checkpoint_every=0"])
    losses = train(cfg)["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses


def test_padding_a_short_block_does_not_change_its_loss(monkeypatch):
    # complete_doc is the v1 recipe's mode. (v2 reads full `none` blocks; its conv decoder, as
    # fairseq's Decoder1d, lets padded positions into the last real ones' receptive field.)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = load_config(ROOT / "configs/tiny_text.yaml", ["model.dropout=0.0",
                                                        "model.attention_dropout=0.0"])
    special = dict(bos=0, pad=1, eos=2, unk=3, mask=4095)
    torch.manual_seed(0)
    encoder = build_model(cfg.model, "text")
    model = build_objective(cfg, encoder, special).eval()
    teacher = copy.deepcopy(encoder).eval()
    gen = torch.Generator().manual_seed(3)
    short = torch.cat([torch.tensor([0]), torch.randint(5, 4095, (20,), generator=gen),
                       torch.tensor([2])])[None]
    padded = torch.cat([short, torch.full((1, 11), 1)], dim=1)
    seeds = torch.tensor([12345])
    with torch.no_grad():
        alone = model({"source": short, "padding_mask": short.eq(1)}, teacher, seeds)
        pad = model({"source": padded, "padding_mask": padded.eq(1)}, teacher, seeds)
    assert alone.masked == pad.masked > 0
    assert torch.allclose(alone.loss_sum, pad.loss_sum, rtol=1e-5, atol=1e-6), \
        (alone.loss_sum.item(), pad.loss_sum.item())
