"""Regenerates the small embedded data sets under data/.

They are committed; nothing is downloaded at run time.

The engine never imports this script nor its tools. Run it in a throwaway environment:

    apt-get update && apt-get install -y espeak-ng
    python3 -m venv /tmp/d2v-datagen
    /tmp/d2v-datagen/bin/pip install numpy scipy pillow scikit-learn scikit-image tokenizers
    /tmp/d2v-datagen/bin/python scripts/make_embedded_data.py [--out DIR] [--only images audio text]

Sources, all shipped inside those packages or the Python standard library (licences in
d2v_engine/data/README.md): scikit-learn's `digits` and sample photos, scikit-image's sample images,
espeak-ng speaking the ten digit words, and `pydoc_data.topics` (prose) + stdlib docstrings (probe).
The output depends only on the package versions and the Python version (the text comes from the
running interpreter's standard library); re-running with the same ones gives the same files.
"""
from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import wave
from pathlib import Path

import numpy as np


def _load_tokenize():
    """d2v_engine/data/tokenize.py by file, not through d2v_engine.data (whose __init__ needs torch)."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))  # for d2v_engine.errors
    spec = importlib.util.spec_from_file_location("d2v_tokenize", repo / "d2v_engine/data/tokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tokenize = _load_tokenize()
train_bpe, write_split = _tokenize.train_bpe, _tokenize.write_split  # what d2v_engine.data.tokenize uses

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# espeak-ng voices (accent + optional "+variant"); the last one is held out as the valid split,
# so valid measures generalisation to an unseen speaker.
VOICES = ["en", "en-us", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbcwmd", "en+f3",
          "en-us+f2", "en+m3", "en-gb-scotland"]
# (words per minute, pitch 0..99) pairs: slow/low to fast/high.
PROSODY = [(130, 40), (160, 60), (190, 30), (220, 70)]
SAMPLE_RATE = 16000
SILENCE_MARGIN_S = 0.1  # kept around the trimmed speech, so the shortest word stays above 0.3 s

# Text probe: function/class/module docstrings of these stdlib packages, labelled by package.
PROBE_PACKAGES = ["asyncio", "email", "http", "importlib", "logging", "tkinter", "unittest", "xml"]
PROBE_PER_CLASS = 80
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
PROBE_MIN_CHARS = 80
# Whole pydoc topics held out as the text valid split (about 5% of the characters).
TEXT_VALID_TOPICS = ["execmodel", "import", "lambda", "while", "with"]
BPE_VOCAB = 4096


def reset_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_digits(out: Path) -> int:
    """scikit-learn digits: 1,797 8x8 images (0..16) -> 32x32 RGB JPEG in one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = reset_dir(out / "images" / "digits")
    for label in range(10):
        (root / str(label)).mkdir()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        gray = Image.fromarray(np.round(image * (255.0 / 16.0)).astype(np.uint8), mode="L")
        big = gray.resize((32, 32), Image.BICUBIC).convert("RGB")
        big.save(root / str(int(label)) / f"{i:04d}.jpg", quality=95)
    return len(digits.images)


def photo_sources() -> list[tuple[str, Path]]:
    """(name, file) of the bundled photos whose licence is stated: CC0, public domain or CC BY."""
    import skimage
    import sklearn.datasets

    sk = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
             "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
             "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "rocket.jpg", "text.png"]
    files = [(Path(n).stem, sk / n) for n in names]
    sample = Path(sklearn.datasets.__file__).parent / "images"
    files += [(f"sklearn_{n}", sample / f"{n}.jpg") for n in ("china", "flower")]
    return files


def make_photos(out: Path, short_side: int = 144) -> int:
    """Natural photos resized so the short side is `short_side`, flat folder (unlabelled)."""
    from PIL import Image

    root = reset_dir(out / "images" / "photos")
    files = photo_sources()
    for name, src in files:
        with Image.open(src) as im:
            im = im.convert("RGB")
            scale = short_side / min(im.size)
            size = (round(im.width * scale), round(im.height * scale))
            im.resize(size, Image.LANCZOS).save(root / f"{name}.jpg", quality=90)
    return len(files)


def speak(word: str, voice: str, rate: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng -> float waveform at SAMPLE_RATE, silence trimmed to SILENCE_MARGIN_S each side."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    raw = tmp / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(raw),
                    word], check=True, capture_output=True)
    rate_in, pcm = wavfile.read(raw)
    x = pcm.astype(np.float64) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.02)
    margin = int(SILENCE_MARGIN_S * rate_in)
    x = x[max(loud[0] - margin, 0): loud[-1] + margin]
    g = np.gcd(SAMPLE_RATE, rate_in)
    return resample_poly(x, SAMPLE_RATE // g, rate_in // g)


def write_wav16(path: Path, x: np.ndarray) -> int:
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return len(pcm)


def make_audio(out: Path) -> int:
    """Spoken digits: fairseq manifests train/valid.tsv (root `wav`) + one digit label per line."""
    root = out / "audio"
    wav_dir = reset_dir(root / "wav")
    rows = {"train": [], "valid": []}
    with tempfile.TemporaryDirectory() as tmp:
        for voice in VOICES:
            split = "valid" if voice == VOICES[-1] else "train"
            for rate, pitch in PROSODY:
                for digit, word in enumerate(DIGIT_WORDS):
                    name = f"{voice.replace('+', '_')}_s{rate}_p{pitch}_{digit}.wav"
                    n = write_wav16(wav_dir / name, speak(word, voice, rate, pitch, Path(tmp)))
                    rows[split].append((name, n, digit))
    for split, items in rows.items():
        (root / f"{split}.tsv").write_text("wav\n" + "".join(f"{p}\t{n}\n" for p, n, _ in items))
        (root / f"{split}.label").write_text("".join(f"{d}\n" for _, _, d in items))
    return sum(len(v) for v in rows.values())


def topic_paragraphs(names: list[str]) -> list[str]:
    """pydoc topics split at blank lines; each paragraph is one document."""
    from pydoc_data.topics import topics

    docs = []
    for name in names:
        docs += [p.strip("\n") for p in topics[name].split("\n\n") if p.strip()]
    return docs


def probe_docstrings(seed: int = 0) -> list[tuple[str, int]]:
    """(docstring, package index): PROBE_PER_CLASS random docstrings per package, shuffled."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    out = []
    for label, package in enumerate(PROBE_PACKAGES):
        found = []
        for path in sorted((lib / package).rglob("*.py")):
            if {"test", "tests", "idle_test"} & set(path.parts):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, DOCUMENTED):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= PROBE_MIN_CHARS:
                        found.append(doc)
        found = sorted(set(found))
        if len(found) < PROBE_PER_CLASS:
            raise SystemExit(f"only {len(found)} docstrings in {package}")
        pick = rng.choice(len(found), PROBE_PER_CLASS, replace=False)
        out += [(found[i], label) for i in sorted(pick)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def make_text(out: Path) -> dict:
    """BPE-4096 on pydoc topics; train/valid token streams; labelled docstring probe set."""
    from pydoc_data.topics import topics

    root = reset_dir(out / "text")
    train_topics = sorted(set(topics) - set(TEXT_VALID_TOPICS))
    splits = {"train": topic_paragraphs(train_topics), "valid": topic_paragraphs(TEXT_VALID_TOPICS)}
    tok = train_bpe(splits["train"], BPE_VOCAB)  # the same BPE `python -m d2v_engine.cli.tokenize` trains
    tok.save(str(root / "tokenizer.json"))
    probe = probe_docstrings()
    splits["probe"] = [doc for doc, _ in probe]
    (root / "probe.label").write_text("".join(f"{label}\n" for _, label in probe))
    num_tokens, num_docs = {}, {}
    for split, docs in splits.items():
        num_tokens[split], num_docs[split] = write_split(root, split, tok, docs, eos=2)
    meta = {
        "vocab_size": BPE_VOCAB, "bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": BPE_VOCAB - 1,
        "num_tokens": num_tokens, "num_docs": num_docs,
        "source": f"Python {sys.version.split()[0]} pydoc_data.topics, one document per paragraph; "
                  f"valid = topics {TEXT_VALID_TOPICS}; probe = stdlib docstrings "
                  f"({PROBE_PER_CLASS} per package, >= {PROBE_MIN_CHARS} chars)",
        "probe_labels": PROBE_PACKAGES,
        "tokenizer": "tokenizer.json (byte-level BPE trained on the train split)",
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    parser.add_argument("--only", nargs="+", choices=["images", "audio", "text"],
                        default=["images", "audio", "text"])
    args = parser.parse_args(argv)
    if "images" in args.only:
        print(f"digits: {make_digits(args.out)} images; photos: {make_photos(args.out)} images")
    if "audio" in args.only:
        print(f"audio: {make_audio(args.out)} utterances")
    if "text" in args.only:
        meta = make_text(args.out)
        print(f"text: tokens {meta['num_tokens']}, documents {meta['num_docs']}")


if __name__ == "__main__":
    main()
