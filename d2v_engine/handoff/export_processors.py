"""The input side of an export: what turns a raw file into the exported model's inputs.

    audio  preprocessor_config.json: Wav2Vec2FeatureExtractor at data.sample_rate, do_normalize =
           data.normalize (per utterance, as d2v_engine.data.audio), attention masks returned: the
           exported Data2VecAudio takes them for padding (1 = keep), as our padding_mask (True =
           pad) inverted; padding value 0.0, as our collate pads.
    image  preprocessor_config.json: BEiT's image processor as our eval path (d2v_engine.data.images
           with data.augment off): short side to data.img_size (int() of the long side, PIL's
           filter of data.interpolation), center crop img_size x img_size, /255, ImageNet mean/std.
    text   tokenizer.json + tokenizer_config.json: the token folder's tokenizer.json (written by
           d2v_engine.data.tokenize, which encoded the run's data with it), with <s> ... </s> added
           around every input and our special ids, so `tokenizer(text)` gives our loader's ids.

Audio and image also get `d2v_processing.py` (d2v_engine/handoff/hf_processing.py) in the config's auto_map:
with trust_remote_code=True the processors are exactly our loader's eval path; the stock classes
differ slightly (that module's docstring says how).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from d2v_engine.config import Config
from d2v_engine.data.images import IMAGENET_MEAN, IMAGENET_STD
from d2v_engine.data.text import read_meta
from d2v_engine.data.tokenize import SPECIAL_KEYS
from d2v_engine.errors import DataError

REMOTE_MODULE = "d2v_processing"
AUDIO_NORMALIZE_EPS = 1e-5  # F.layer_norm's default: d2v_engine.data.audio and dali_audio use it
ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, data/


def _add_auto_map(config_file: Path, auto_class: str, class_name: str) -> None:
    """Adds our exact class to a saved processor config; the stock class it names stays the
    default for loaders without trust_remote_code."""
    data = json.loads(config_file.read_text())
    data["auto_map"] = {auto_class: f"{REMOTE_MODULE}.{class_name}"}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def audio_processor(cfg: Config):
    """A Wav2Vec2FeatureExtractor as our eval path (normalize_eps for D2VFeatureExtractor)."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=cfg.data.sample_rate, padding_value=0.0,
        do_normalize=cfg.data.normalize, return_attention_mask=True)
    extractor.normalize_eps = AUDIO_NORMALIZE_EPS  # saved with the config; read by our class
    return extractor


def image_processor(cfg: Config):
    """BEiT's PIL image processor as our eval path."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil

    size = cfg.data.img_size
    return BeitImageProcessorPil(
        do_resize=True, size={"shortest_edge": size},
        resample=PILImageResampling[cfg.data.interpolation.upper()],
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
        do_reduce_labels=False)


def resolve_data_path(path: str) -> Path | None:
    """data.path as the run saw it: absolute, else from the current folder or the repository."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]):
        if candidate.exists():
            return candidate
    return None


def find_tokenizer(cfg: Config, tokenizer_file: str | Path | None = None) -> tuple[Path, dict]:
    """(tokenizer.json, the token folder's meta.json or {}) of a text run: the given file, else
    tokenizer.json in the run's data.path; DataError when neither exists."""
    folder = resolve_data_path(cfg.data.path) if cfg.data.path else None
    meta = read_meta(folder) if folder is not None and (folder / "meta.json").is_file() else {}
    if tokenizer_file is not None:
        path = Path(tokenizer_file)
        if not path.is_file():
            raise DataError(f"--tokenizer {path}: file not found")
        return path, meta
    if folder is None:
        raise DataError(f"config key 'data.path': {cfg.data.path!r} not found (looked in the "
                        "current folder and the repository); pass --tokenizer TOKENIZER_JSON")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{folder} has no tokenizer.json (d2v_engine.data.tokenize writes it there); "
                        "pass --tokenizer TOKENIZER_JSON")
    return path, meta


def text_tokenizer(cfg: Config, tokenizer_file: str | Path | None = None) -> tuple[object, dict]:
    """(PreTrainedTokenizerFast with our ids, putting <s> ... </s> around each input,
    {"tokenizer_file", "special_ids"}); DataError when the tokenizer does not fit the run."""
    from tokenizers import Tokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast

    path, meta = find_tokenizer(cfg, tokenizer_file)
    tok = Tokenizer.from_file(str(path))
    ids = {key: tok.token_to_id(name) for key, name in SPECIAL_KEYS.items()}
    missing = [SPECIAL_KEYS[k] for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"{path}: lacks the special tokens {missing}")
    ours = {**ids, "vocab_size": tok.get_vocab_size()}
    wrong = {k: (v, meta[k]) for k, v in ours.items() if k in meta and meta[k] != v}
    if wrong:
        raise DataError(f"{path} does not match its token folder's meta.json: "
                        f"(tokenizer, meta.json) {wrong}")
    if ids["pad"] != cfg.model.pad_id:
        raise DataError(f"{path}: <pad> is id {ids['pad']}, config key 'model.pad_id' is "
                        f"{cfg.model.pad_id}")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise DataError(f"{path}: {tok.get_vocab_size()} ids do not fit config key "
                        f"'model.vocab_size'={cfg.model.vocab_size}")
    # Our loader puts <s> and </s> around every sample (d2v_engine.data.text); so does this, with
    # our ids, whatever post-processor the file had.
    tok.post_processor = RobertaProcessing(("</s>", ids["eos"]), ("<s>", ids["bos"]))
    # cls/sep: RoBERTa's names for <s> and </s>, which HF's RoBERTa-style models look up.
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
        model_max_length=cfg.model.max_positions, padding_side="right",
        model_input_names=["input_ids", "attention_mask"])
    return hf, {"tokenizer_file": str(path), "special_ids": ids}


def build_processor(cfg: Config, tokenizer_file: str | Path | None = None) -> tuple[object, dict]:
    """(processor of the run's modality, facts for the model card), checked against the run
    before anything is written."""
    if cfg.modality == "audio":
        return audio_processor(cfg), {}
    if cfg.modality == "image":
        return image_processor(cfg), {}
    return text_tokenizer(cfg, tokenizer_file)


def save_processor(cfg: Config, processor, out_dir: Path) -> None:
    """The processor's files in out_dir; audio and image also name our exact class (auto_map)."""
    saved = processor.save_pretrained(out_dir)
    if cfg.modality == "text":
        return
    auto = {"audio": ("AutoFeatureExtractor", "D2VFeatureExtractor"),
            "image": ("AutoImageProcessor", "D2VImageProcessor")}[cfg.modality]
    _add_auto_map(Path(saved[0]), *auto)
    shutil.copyfile(Path(__file__).with_name("hf_processing.py"), out_dir / f"{REMOTE_MODULE}.py")
