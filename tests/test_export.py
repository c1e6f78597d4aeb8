"""Export to Hugging Face transformers and the linear probe, on 2-step tiny runs of each modality."""
import json
from pathlib import Path

import pytest
import torch
import transformers

from engine.config import load_config
from engine.errors import ConfigError
from engine.export import export, hf_config, load_encoder, main as export_main
from engine.probe import run_probe
from engine.trainer import train

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
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
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
    from engine.models import build_model
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
    from engine.export import EncoderForExport
    from engine.export_remote import to_remote_model
    from engine.models import build_model

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
    from engine.export import EncoderForExport, to_hf_model
    from engine.models import build_model

    cfg = load_config(ROOT / "configs/tiny_image_v2.yaml")
    encoder = build_model(cfg.model, "image")
    with pytest.raises(ConfigError, match="layer_norm_first"):
        hf_config(cfg, encoder)
    with pytest.raises(ConfigError, match="layer_norm_first"):
        to_hf_model(EncoderForExport(encoder, cfg))
