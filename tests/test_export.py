"""Export to Hugging Face transformers and the linear probe, on 2-step tiny runs of each modality."""
import json
from pathlib import Path

import pytest
import torch

# The probe tests below share this module's runs, so they skip with it.
transformers = pytest.importorskip("transformers")

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
