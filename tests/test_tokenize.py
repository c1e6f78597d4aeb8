"""d2v_engine.data.tokenize: the explicit SPLIT=FILE form -> token folder -> TokenDataset round trip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

Tokenizer = pytest.importorskip("tokenizers").Tokenizer

from d2v_engine.config import DataConfig
from d2v_engine.data import build_dataset
from d2v_engine.cli.tokenize import main
from d2v_engine.data.tokenize import train_bpe, write_split

REPO = Path(__file__).resolve().parents[1]
LINES = [f"Sentence {i}: the quick brown fox number {i * 7} jumps over the lazy dog again."
         for i in range(120)]


def test_tokenize_trains_bpe_and_round_trips_through_the_dataset(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(LINES[:100]) + "\n")
    (tmp_path / "valid.txt").write_text("\n\n".join(LINES[100:]) + "\n")
    out = tmp_path / "tok"
    assert main([str(out), f"train={tmp_path / 'train.txt'}", f"valid={tmp_path / 'valid.txt'}",
                 "--vocab-size", "400", "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    vocab = meta["vocab_size"]
    assert 300 < vocab <= 400 and meta["num_docs"] == {"train": 100, "valid": 20}, meta
    assert (meta["bos"], meta["pad"], meta["eos"], meta["unk"], meta["mask"]) == (0, 1, 2, 3,
                                                                                   vocab - 1)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ds = build_dataset(DataConfig(path=str(out), max_tokens=16), "text", "valid")
    assert len(ds.offsets) == 21 and len(ds.tokens) == meta["num_tokens"]["valid"]
    for doc in (0, 7, 19):
        ids = np.asarray(ds.tokens[ds.offsets[doc]:ds.offsets[doc + 1]])
        assert ids[-1] == 2, "every document ends with </s>"
        assert tok.decode(ids[:-1].tolist()) == LINES[100 + doc]
    stream = np.concatenate([ds.load(i, None)["source"].numpy()[1:] for i in range(len(ds))])
    assert np.array_equal(stream, np.asarray(ds.tokens)), "blocks must cover the stream"


def test_tokenize_with_an_existing_tokenizer_matches_the_embedded_data(tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n\nA paragraph of prose.\n")
    assert main([str(tmp_path / "o"), f"train={tmp_path / 'a.txt'}", "--docs", "paragraphs",
                 "--tokenizer", str(REPO / "data" / "text" / "tokenizer.json"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["num_docs"]["train"] == 2 and meta["mask"] == 4095
    assert meta["dtype"] == "uint16"


def test_tokenize_errors_are_one_line_naming_the_file(tmp_path, capsys):
    assert main([str(tmp_path / "o"), f"train={tmp_path / 'nope.txt'}"]) == 2
    assert "nope.txt" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "bad.json").write_text(Tokenizer.from_file(
        str(REPO / "data" / "text" / "tokenizer.json")).to_str().replace('"<mask>"', '"<msk>"'))
    assert main([str(tmp_path / "o"), f"train={tmp_path / 'a.txt'}", "--tokenizer",
                 str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "<mask>" in err and err.count("\n") == 1, err


def test_special_token_spellings_in_the_text_stay_text(tmp_path):
    docs = ["a literal </s> and <mask> and <s> in prose", "plain"]
    tok = train_bpe(docs * 20, 320)
    write_split(tmp_path, "train", tok, docs, eos=2)
    ids = np.fromfile(tmp_path / "train.bin", dtype="<u2")
    offsets = np.fromfile(tmp_path / "train.idx", dtype="<i8")
    assert offsets.tolist()[0] == 0 and len(offsets) == 3
    specials = {0, 2, tok.get_vocab_size() - 1}
    assert not specials & set(ids[:offsets[1] - 1].tolist()), "only the format's </s> is special"
    assert tok.decode(ids[:offsets[1] - 1].tolist(), skip_special_tokens=False) == docs[0]


def test_uint32_token_files_are_read(tmp_path):
    meta = {"vocab_size": 70000, "bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 69999,
            "dtype": "uint32"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.array([5, 69000, 2, 7, 2], dtype="<u4").tofile(tmp_path / "train.bin")
    np.array([0, 3, 5], dtype="<i8").tofile(tmp_path / "train.idx")
    ds = build_dataset(DataConfig(path=str(tmp_path), max_tokens=8), "text")
    assert ds.load(0, None)["source"].tolist() == [0, 5, 69000, 2, 7, 2]
