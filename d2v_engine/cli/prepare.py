"""Check a raw data folder once, offline, and write what the loaders read plus a report.

    d2v-prepare audio SRC_DIR OUT_DIR [--valid-percent P] [--sample-rate 16000]
                                 [--resample] [--min-seconds S] [--max-seconds S] [--workers N]
    d2v-prepare image SRC_DIR OUT_DIR [--valid-percent P] [--workers N]
    d2v-prepare text SRC OUT_DIR [--docs file|paragraphs|lines] [--valid-percent P]
                                [--vocab-size 8192 | --tokenizer tokenizer.json] [--min-tokens N]
                                [--errors strict|replace] [--no-dedup] [--workers N]

Every file is decoded once, in a pool over the machine's cores, with the same decoder the
loader uses, so a file that passes here loads in training. What each writes in OUT_DIR:

audio  train.tsv / valid.tsv, fairseq manifests: the root line (SRC_DIR, absolute), then
       `relative_path<TAB>num_samples`. With --resample, other rates and several channels are
       resampled (band-limited, FFT) / averaged to mono and written as 16-bit WAV under
       OUT_DIR/resampled/ (never over the source); their manifest paths are relative to the root
       too (they start with ../ when OUT_DIR is outside SRC_DIR). data.path=OUT_DIR.
image  train.tsv (/ valid.tsv): the root line, then `relative_path[<TAB>label]`; class
       sub-folders (sorted by name) become labels 0..n-1, their names in classes.txt.
       data.path=OUT_DIR/train.tsv.
text   the token folder of d2v_engine/data/text.py: meta.json, tokenizer.json, train.bin / .idx
       (valid.bin / .idx); documents rejected by reason (d2v_engine/prepare/text.py). data.path=OUT_DIR.
report.json  {"accepted", "rejected": {reason: count}, "rejected_files": [{"path", "reason"}]
       (first 100; text adds the byte "offset"), "total_seconds" (audio) | "total_tokens"
       (text), "lengths": {"min", "p50", "p95", "max"}} with lengths in seconds (audio),
       short-side pixels (image), tokens per document, </s> included (text).

--valid-percent is a fraction, as in fairseq's wav2vec_manifest (0.01 = 1 %); the held-out files
are a seeded draw (--seed), so the split is reproducible. Exit 0 when anything was accepted;
exit 2, with the counts by reason and no manifest, when nothing was. Every error is one line
naming the file or option and the reason, exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from d2v_engine.errors import debug, error_line
from d2v_engine.prepare.common import default_workers, fraction_arg, positive_int_arg, seconds_arg
from d2v_engine.prepare.media import prepare_audio, prepare_image


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    from d2v_engine.prepare.text import add_arguments as text_arguments

    parser = argparse.ArgumentParser(
        prog="d2v-prepare",
        description="Check a raw data folder and write the manifests the loaders read, plus "
                    "OUT_DIR/report.json. Exit 0 when anything was accepted, 2 when nothing was.")
    sub = parser.add_subparsers(dest="modality", required=True)

    def common(p):
        p.add_argument("src", metavar="SRC_DIR", help="folder scanned recursively")
        p.add_argument("out", metavar="OUT_DIR", help="where manifests and report.json go")
        p.add_argument("--valid-percent", type=fraction_arg, default=0.0,
                       help="fraction of accepted files held out in valid.tsv (0.01 = 1 %%)")
        p.add_argument("--seed", type=int, default=42, help="seed of the valid draw")
        p.add_argument("--workers", type=positive_int_arg, default=default_workers(),
                       help="decoding processes (default: the usable cores)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--no-follow-symlinks", action="store_true",
                       help="follow no symlinked folder or file (default: those leading outside "
                            "SRC_DIR, each folder read once)")
        p.add_argument("--max-file-bytes", type=positive_int_arg, default=1 << 30,
                       help="files over this many bytes are rejected as too_large (default "
                            "1 GiB, the loaders' data.max_file_bytes)")

    audio = sub.add_parser("audio", help="wav/flac folder -> train.tsv / valid.tsv")
    common(audio)
    audio.add_argument("--sample-rate", type=positive_int_arg, default=16000)
    audio.add_argument("--resample", action="store_true",
                       help="resample other rates and downmix several channels into "
                            "OUT_DIR/resampled/ instead of rejecting them")
    audio.add_argument("--min-seconds", type=seconds_arg, default=None)
    audio.add_argument("--max-seconds", type=seconds_arg, default=None)
    image = sub.add_parser("image", help="image folder (class sub-folders = labels) -> train.tsv")
    common(image)
    text = sub.add_parser(
        "text", help="text folder or file -> token folder (train.bin / .idx, meta.json)",
        prog=prog, usage=f"{prog or parser.prog + ' text'} SRC OUT_DIR [options]\n       "
                         f"{prog or parser.prog + ' text'} OUT_DIR SPLIT=PATH [SPLIT=PATH ...] "
                         "[options]")
    text_arguments(text)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The whole command; the exit code (`prog` names d2v_engine.data.tokenize in text usage lines)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as e:  # argparse's usage error (exit 2) or --help (exit 0)
        return 2 if isinstance(e.code, str) else int(e.code or 0)
    try:
        if args.modality == "text":
            from d2v_engine.prepare.text import prepare_text
            return prepare_text(args)
        return prepare_audio(args) if args.modality == "audio" else prepare_image(args)
    except Exception as e:  # an output folder that cannot be written, a file gone while reading
        line = error_line(e)
        if line is None or debug():
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
