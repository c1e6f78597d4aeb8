"""Export to Hugging Face transformers (weights, processor, model card; HF's processors, pipelines
and Trainer on the export) and the linear probe, on 2-step tiny runs of each modality."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The probe tests below share this module's runs, so they skip with it.
transformers = pytest.importorskip("transformers")

from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError, DataError
from d2v_engine.cli.export import main as export_main
from d2v_engine.handoff.export import export, hf_config, load_encoder
from d2v_engine.handoff.probe import run_probe
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ["image", "audio", "text"]
HF_CLASS = {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel",
            "text": "Data2VecTextModel"}


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-step tiny run per modality (shared by the tests of this module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    out = {}
    try:
        for m in MODALITIES:
            run_dir = tmp_path_factory.mktemp(f"run_{m}")
            train(load_config(ROOT / f"configs/tiny_{m}.yaml",
                              [f"run.dir={run_dir}", "train.max_steps=2", "train.progress=false"]))
            out[m] = run_dir
    finally:
        mp.undo()
    return out


def _inputs(modality, cfg):
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return {"pixel_values": torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size, generator=g)}
    if modality == "audio":
        return {"input_values": torch.randn(3, 8000, generator=g)}
    ids = torch.randint(5, cfg.model.vocab_size - 1, (3, 20), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids}


@pytest.mark.latest
@pytest.mark.parametrize("modality", MODALITIES)
def test_exported_model_matches_our_encoder(modality, runs, tmp_path):
    out_dir = tmp_path / "hf"
    assert export_main([str(runs[modality]), str(out_dir)]) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    hf, info = transformers.AutoModel.from_pretrained(out_dir, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == HF_CLASS[modality]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_encoder(runs[modality])
    assert not ours.training
    inputs = _inputs(modality, ours.cfg)
    with torch.no_grad():
        expected = ours(next(iter(inputs.values())))
        got = hf(**inputs).last_hidden_state
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_exported_model_matches_with_padding(modality, runs, tmp_path):
    export(runs[modality], tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_encoder(runs[modality])
    inputs = _inputs(modality, ours.cfg)
    source = next(iter(inputs.values()))
    pad = torch.zeros(source.shape, dtype=torch.bool)
    pad[1, source.shape[1] * 3 // 4:] = True
    pad[2, source.shape[1] // 3:] = True
    source = source.masked_fill(pad, 0.0 if modality == "audio" else ours.cfg.model.pad_id)
    with torch.no_grad():
        expected, frame_pad = ours.encode_with_padding(source, pad)
        key = "input_values" if modality == "audio" else "input_ids"
        got = hf(**{key: source, "attention_mask": (~pad).long()}).last_hidden_state
    keep = ~frame_pad  # HF's outputs at padded positions are unspecified
    assert frame_pad.any() and keep.any()
    assert (got - expected)[keep].abs().max().item() < 1e-4


@pytest.mark.parametrize("modality", MODALITIES)
def test_load_encoder_round_trips_the_checkpoint(modality, runs):
    ckpt = sorted(Path(runs[modality]).glob("checkpoint_*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    enc = load_encoder(ckpt)
    for name, value in enc.encoder.state_dict().items():
        assert torch.equal(value, state["model"][f"encoder.{name}"]), name
    assert load_encoder(runs[modality]).checkpoint_path == ckpt
    init = load_encoder(ckpt, random_init=True)
    differs = any(not torch.equal(a, b) for a, b in zip(init.encoder.state_dict().values(),
                                                          enc.encoder.state_dict().values()))
    assert differs


def test_unexportable_feature_is_a_config_error():
    cfg = load_config(ROOT / "configs/tiny_audio.yaml", ["model.layer_norm_first=true"])
    from d2v_engine.models import build_model
    with pytest.raises(ConfigError, match="layer_norm_first"):
        hf_config(cfg, build_model(cfg.model, "audio"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_probe_writes_accuracies(modality, runs):
    result = run_probe(runs[modality], max_samples=200)
    saved = json.loads((Path(runs[modality]) / "probe.json").read_text())
    for key in ("checkpoint_accuracy", "random_init_accuracy", "num_train", "num_test",
                "modality", "checkpoint"):
        assert key in saved, key
    assert saved["modality"] == modality
    assert saved["num_train"] + saved["num_test"] == 200
    assert 0.0 <= saved["checkpoint_accuracy"] <= 1.0
    assert 0.0 <= saved["random_init_accuracy"] <= 1.0
    assert result["checkpoint_accuracy"] == saved["checkpoint_accuracy"]


# --------------------------------------------------------------------------------------------
# data2vec 2.0 image encoder (post-LN): its own modeling file, never Data2VecVision


@pytest.fixture(scope="module")
def v2_image_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    try:
        run_dir = tmp_path_factory.mktemp("run_image_v2")
        train(load_config(ROOT / "configs/tiny_image_v2.yaml",
                          [f"run.dir={run_dir}", "train.max_steps=2", "train.progress=false"]))
    finally:
        mp.undo()
    return run_dir


@pytest.mark.latest
def test_post_ln_image_exports_with_its_own_modeling_file(v2_image_run, tmp_path):
    out_dir = tmp_path / "hf"
    assert export_main([str(v2_image_run), str(out_dir)]) == 0
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_data2vec2_vision.py",
            "configuration_data2vec2_vision.py"} <= files, files
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "data2vec2-vision" and "AutoModel" in config["auto_map"]
    hf, info = transformers.AutoModel.from_pretrained(out_dir, trust_remote_code=True,
                                                      output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(hf).__name__ == "Data2Vec2VisionModel"
    ours = load_encoder(v2_image_run)
    assert not ours.cfg.model.layer_norm_first
    pixels = _inputs("image", ours.cfg)["pixel_values"]
    with torch.no_grad():
        expected = ours(pixels)
        got = hf(pixel_values=pixels).last_hidden_state
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_post_ln_image_with_relative_bias_exports_equal(tmp_path):
    from d2v_engine.handoff.export import EncoderForExport
    from d2v_engine.handoff.export_remote import to_remote_model
    from d2v_engine.models import build_model

    cfg = load_config(ROOT / "configs/tiny_image_v2.yaml", ["model.rel_pos_bias=true"])
    torch.manual_seed(0)
    encoder = build_model(cfg.model, "image").eval()
    with torch.no_grad():
        encoder.rel_pos_bias.table.normal_()  # zeros at init would hide an index mix-up
    model = to_remote_model(EncoderForExport(encoder, cfg))
    pixels = _inputs("image", cfg)["pixel_values"]
    with torch.no_grad():
        err = (model(pixel_values=pixels).last_hidden_state - encoder(pixels).x).abs().max()
    assert err.item() < 1e-4


def test_post_ln_image_is_never_exported_as_data2vecvision():
    from d2v_engine.handoff.export import EncoderForExport, to_hf_model
    from d2v_engine.models import build_model

    cfg = load_config(ROOT / "configs/tiny_image_v2.yaml")
    encoder = build_model(cfg.model, "image")
    with pytest.raises(ConfigError, match="layer_norm_first"):
        hf_config(cfg, encoder)
    with pytest.raises(ConfigError, match="layer_norm_first"):
        to_hf_model(EncoderForExport(encoder, cfg))


# ----------------------------------------------------------------------------------------------
# Hugging Face's own clients on the export: processors, pipelines, Trainer, the model card


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each run of `runs` exported once (shared by the tests below)."""
    return {m: export(runs[m], tmp_path_factory.mktemp(f"hf_{m}")) for m in MODALITIES}


def _eval_datasets(run_dir):
    """Our loader's eval path on the embedded labelled data: the probe's datasets (augment off)."""
    from d2v_engine.handoff.probe import probe_datasets

    return probe_datasets(load_encoder(run_dir).cfg)


def _raw_audio(ds, i):
    from d2v_engine.data.audio import read_audio

    return read_audio(ds.root / ds.files[i])[0][:, 0]


def _doc_text(tokenizer, ds, i):
    """The raw text of labelled document i (byte-level BPE decodes losslessly)."""
    return tokenizer.decode(ds.tokens[ds.offsets[i]:ds.offsets[i + 1] - 1].tolist())


@pytest.mark.latest
def test_audio_feature_extractor_gives_our_eval_inputs(runs, exports):
    fe = transformers.AutoFeatureExtractor.from_pretrained(exports["audio"], trust_remote_code=True)
    stock = transformers.AutoFeatureExtractor.from_pretrained(exports["audio"])
    cfg = load_encoder(runs["audio"]).cfg
    assert type(fe).__name__ == "D2VFeatureExtractor" and fe.normalize_eps == 1e-5
    assert type(stock).__name__ == "Wav2Vec2FeatureExtractor"
    for extractor in (fe, stock):
        assert extractor.sampling_rate == cfg.data.sample_rate
        assert extractor.do_normalize == cfg.data.normalize and extractor.return_attention_mask
    rng = np.random.default_rng(0)
    worst, count = 0.0, 0
    for ds in _eval_datasets(runs["audio"]):
        for i in range(len(ds)):
            ours = ds.load(i, rng)["source"].numpy()
            got = fe(_raw_audio(ds, i), sampling_rate=cfg.data.sample_rate)["input_values"][0]
            assert got.shape == ours.shape
            worst, count = max(worst, float(np.abs(got - ours).max())), count + 1
    assert count >= 400 and worst < 1e-5, f"max |HF - ours| {worst:.3e} over {count} files"
    # A padded batch: the same values and HF's attention mask = our padding mask inverted.
    ds = _eval_datasets(runs["audio"])[0]
    ds.cfg.pad_audio = True
    ours = ds.collate([ds.load(i, rng) for i in range(4)], rng)
    got = fe([_raw_audio(ds, i) for i in range(4)], sampling_rate=cfg.data.sample_rate,
             padding=True, return_tensors="pt")
    assert ours["padding_mask"].any()
    assert torch.equal(got["attention_mask"].bool(), ~ours["padding_mask"])
    assert (got["input_values"] - ours["source"]).abs().max().item() < 1e-5


@pytest.mark.latest
def test_image_processor_gives_our_eval_inputs(runs, exports):
    from PIL import Image

    from d2v_engine.data import build_dataset
    from d2v_engine.data.images import center_crop_geometry

    auto = transformers.AutoImageProcessor
    exact = auto.from_pretrained(exports["image"], trust_remote_code=True)
    stock = auto.from_pretrained(exports["image"], backend="pil")
    assert type(exact).__name__ == "D2VImageProcessor"
    digits = _eval_datasets(runs["image"])[0]
    photos_cfg = copy.deepcopy(digits.cfg)
    photos_cfg.path = str(ROOT / "data/images/photos")
    photos = build_dataset(photos_cfg, "image")  # not square: the crop has work to do
    size, rng = digits.cfg.img_size, np.random.default_rng(0)
    stock_differs, offsets_differ = set(), set()
    for ds, indices in ((digits, range(0, len(digits), 9)), (photos, range(len(photos)))):
        for i in indices:
            ours = ds.load(i, rng)["source"].numpy()
            with Image.open(ds.files[i]) as img:
                got = exact(img, return_tensors="np")["pixel_values"][0]
                plain = stock(img, return_tensors="np")["pixel_values"][0]
                w, h, left, top = center_crop_geometry(*img.size, size)
            assert got.shape == ours.shape == (3, size, size)
            err = float(np.abs(got - ours).max())
            assert err < 1e-5, f"{ds.files[i]}: max |HF - ours| {err:.3e}"
            if float(np.abs(plain - ours).max()) >= 1e-5:
                stock_differs.add(ds.files[i])
            if (left, top) != ((w - size) // 2, (h - size) // 2):
                offsets_differ.add(ds.files[i])
    # The stock processor is our eval path wherever its floored crop offset is ours.
    assert offsets_differ and stock_differs == offsets_differ, (stock_differs, offsets_differ)


@pytest.mark.latest
def test_tokenizer_gives_our_loader_ids(runs, exports):
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(exports["text"])
    ds = _eval_datasets(runs["text"])[0]
    ids = ds.special_ids
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
            tok.mask_token_id) == (ids["bos"], ids["pad"], ids["eos"], ids["unk"], ids["mask"])
    max_tokens, rng = ds.cfg.max_tokens, np.random.default_rng(0)
    texts = [_doc_text(tok, ds, i) for i in range(len(ds))]
    for i, text in enumerate(texts):
        want = ds.load(i, rng)["source"].tolist()
        assert tok(text, truncation=True, max_length=max_tokens)["input_ids"] == want, i
    batch = tok(texts[:5], truncation=True, max_length=max_tokens, padding=True,
                return_tensors="pt")
    ours = ds.collate([ds.load(i, rng) for i in range(5)], rng)
    assert torch.equal(batch["input_ids"], ours["source"])
    assert torch.equal(batch["attention_mask"].bool(), ~ours["padding_mask"])
    # Fresh raw text, as d2v_engine.data.tokenize encodes a document (no specials) then <s> ... </s>.
    ours_tok = Tokenizer.from_file(str(ROOT / "data/text/tokenizer.json"))
    for text in ("  Leading spaces,\ttabs and a newline\nhere.",
                 "Unicode: naïve café – 東京 🙂",
                 "def f(x):\n    return x ** 2  # a <mask> in raw text: the mask id in both"):
        body = ours_tok.encode(text, add_special_tokens=False).ids
        assert tok(text)["input_ids"] == [ids["bos"], *body, ids["eos"]], text


def test_text_export_needs_the_runs_tokenizer(runs, tmp_path):
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    assert export_main([str(runs["text"]), str(tmp_path / "a"), "--tokenizer", "nope.json"]) == 2
    assert not (tmp_path / "a").exists()  # checked before anything is written
    other = ByteLevelBPETokenizer()  # specials in another order: ids that do not match ours
    other.train_from_iterator(["some text to learn from"] * 10, vocab_size=300,
                              special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    other.add_special_tokens([AddedToken("<mask>")])
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match="meta.json"):
        export(runs["text"], tmp_path / "b", tmp_path / "other.json")


@pytest.mark.parametrize("modality", MODALITIES)
def test_model_card_states_the_runs_facts(modality, runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[modality], run_dir)
    probe = {"modality": modality, "checkpoint": "checkpoint_00000002.pt", "num_train": 160,
             "num_test": 40, "checkpoint_accuracy": 0.8125, "random_init_accuracy": 0.5}
    (run_dir / "probe.json").write_text(json.dumps(probe))
    card = (export(run_dir, tmp_path / "hf") / "README.md").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r and "event" not in r][-1]
    facts = [f"data2vec 1.0 {modality} encoder", "objective: data2vec 1.0 (v1)",
             f"`transformers.{HF_CLASS[modality]}`", "steps: 2 ", f"{last['loss']:.4f}",
             (run_dir / "command.txt").read_text().strip(), "accuracy 0.8125, random init 0.5000",
             f"configs/{modality}_base.yaml", "| `model.depth` | `4` | `12` |",
             f"d2v-export {run_dir} {tmp_path / 'hf'}"]
    facts += {"audio": ["manifest train.tsv: 360 files", "16000 Hz"],
              "image": ["center crop 32x32"],
              "text": ["documents {'train': 2469"]}[modality]
    for fact in facts:
        assert fact in card, f"{fact!r} not in the model card:\n{card}"


_OFFLINE_SCRIPT = r'''
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access refused by the test")
socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
import numpy as np, torch, transformers
from PIL import Image
from transformers import pipeline
paths, image_file, audio_file, text = json.loads(sys.argv[1])
out = {}
model = transformers.AutoModel.from_pretrained(paths["image"]).eval()
proc = transformers.AutoImageProcessor.from_pretrained(paths["image"], trust_remote_code=True)
with torch.no_grad():
    inputs = proc(Image.open(image_file), return_tensors="pt")
    out["image_model"] = model(**inputs).last_hidden_state.tolist()
pipe = pipeline("image-feature-extraction", model=paths["image"], trust_remote_code=True)
out["image_pipeline"] = pipe(Image.open(image_file))
model = transformers.AutoModel.from_pretrained(paths["audio"]).eval()
fe = transformers.AutoFeatureExtractor.from_pretrained(paths["audio"], trust_remote_code=True)
from d2v_engine.data.audio import read_audio
wav = read_audio(audio_file)[0][:, 0]
with torch.no_grad():
    inputs = fe(wav, sampling_rate=16000, return_tensors="pt")
    out["audio_model"] = model(**inputs).last_hidden_state.tolist()
pipe = pipeline("audio-classification", model=paths["audio"], trust_remote_code=True)
out["audio_pipeline"] = pipe({"raw": wav, "sampling_rate": 16000}, top_k=None)
out["audio_pipeline_classes"] = [type(pipe.model).__name__, type(pipe.feature_extractor).__name__]
model = transformers.AutoModel.from_pretrained(paths["text"]).eval()
tok = transformers.AutoTokenizer.from_pretrained(paths["text"])
out["text_ids"] = tok(text)["input_ids"]
pipe = pipeline("feature-extraction", model=paths["text"])
out["text_pipeline"] = pipe(text)
print("RESULT" + json.dumps(out))
'''


@pytest.mark.latest
def test_auto_classes_and_pipelines_load_offline_and_give_our_encoder_outputs(runs, exports):
    image_ds = _eval_datasets(runs["image"])[0]
    audio_ds = _eval_datasets(runs["audio"])[0]
    text = "Return the absolute value of the argument."
    paths = {m: str(p) for m, p in exports.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    args = json.dumps([paths, image_ds.files[0], str(audio_ds.root / audio_ds.files[0]), text])
    done = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        image = load_encoder(runs["image"])(image_ds.load(0, rng)["source"][None])
        audio = load_encoder(runs["audio"])(audio_ds.load(0, rng)["source"][None])
        ids = torch.tensor([out["text_ids"]])
        text_ours = load_encoder(runs["text"])(ids)
    for key, ours in (("image_model", image), ("image_pipeline", image),
                      ("audio_model", audio), ("text_pipeline", text_ours)):
        got = torch.tensor(out[key])
        assert got.shape == ours.shape, (key, got.shape, ours.shape)
        assert (got - ours).abs().max().item() < 1e-4, (key, (got - ours).abs().max().item())
    assert out["audio_pipeline_classes"] == ["Data2VecAudioForSequenceClassification",
                                             "D2VFeatureExtractor"]
    scores = [r["score"] for r in out["audio_pipeline"]]
    assert len(scores) == 2 and abs(sum(scores) - 1) < 1e-5  # the new head's 2 default labels


def _classification_items(modality, run_dir, export_dir, count):
    """(items for Trainer, number of labels): `count` seeded labelled samples of the embedded
    data through the export's own processor."""
    from PIL import Image

    ds = _eval_datasets(run_dir)[0]
    chosen = np.random.default_rng(0).choice(len(ds), count, replace=False).tolist()
    labels = [ds.labels[i] for i in chosen]
    if modality == "image":
        proc = transformers.AutoImageProcessor.from_pretrained(export_dir, trust_remote_code=True)
        inputs = proc([Image.open(ds.files[i]) for i in chosen], return_tensors="pt")
    elif modality == "audio":
        fe = transformers.AutoFeatureExtractor.from_pretrained(export_dir, trust_remote_code=True)
        inputs = fe([_raw_audio(ds, i) for i in chosen], sampling_rate=fe.sampling_rate,
                    padding=True, truncation=True, max_length=8000, return_tensors="pt")
    else:
        tok = transformers.AutoTokenizer.from_pretrained(export_dir)
        inputs = tok([_doc_text(tok, ds, i) for i in chosen], truncation=True,
                     max_length=ds.cfg.max_tokens, padding=True, return_tensors="pt")
    items = [{**{k: v[n] for k, v in inputs.items()}, "labels": labels[n]} for n in range(count)]
    return items, ds.num_labels


@pytest.mark.parametrize("modality", MODALITIES)
def test_trainer_fine_tunes_the_export_with_falling_loss(modality, runs, exports, tmp_path):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (the hf extra has it)
    items, num_labels = _classification_items(modality, runs[modality], exports[modality], 24)
    auto = {"image": transformers.AutoModelForImageClassification,
            "audio": transformers.AutoModelForAudioClassification,
            "text": transformers.AutoModelForSequenceClassification}[modality]
    model = auto.from_pretrained(exports[modality], num_labels=num_labels)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
        per_device_eval_batch_size=24, learning_rate=2e-3, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=items, eval_dataset=items)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    assert after < before, f"{modality}: loss on the fine-tuning set {before:.4f} -> {after:.4f}"
