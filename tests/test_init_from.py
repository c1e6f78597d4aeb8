"""model.init_from: a new run's encoders start from exported (Hugging Face) or our own weights."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the fixture exports to Hugging Face

from d2v_engine.checkpoint import latest_checkpoint, load_checkpoint
from d2v_engine.config import load_config
from d2v_engine.errors import CheckpointError, ConfigError
from d2v_engine.handoff.export import export, load_encoder
from d2v_engine.handoff.init_from import init_encoder
from d2v_engine.models import build_model
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ["image", "audio", "text"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per modality: (run dir of a 1-step tiny run, its Hugging Face export)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    out = {}
    try:
        for m in MODALITIES:
            run_dir = tmp_path_factory.mktemp(f"run_{m}")
            train(_cfg(m, run_dir, "train.max_steps=1"))
            out[m] = run_dir, export(run_dir, run_dir / "hf")
    finally:
        mp.undo()
    return out


def _cfg(modality, run_dir, *overrides):
    return load_config(ROOT / f"configs/tiny_{modality}.yaml",
                       [f"run.dir={run_dir}", "train.progress=false", *overrides])


def _source(modality, cfg):
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size, generator=g), None
    if modality == "audio":
        return torch.randn(3, 8000, generator=g), None
    ids = torch.randint(5, cfg.model.vocab_size - 1, (3, 20), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids, None


@pytest.mark.latest
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("source_kind", ["huggingface", "checkpoint"])
def test_encoder_initialized_from_export_gives_the_exported_outputs(modality, source_kind,
                                                                    exported, tmp_path):
    run_dir, hf_dir = exported[modality]
    reference = load_encoder(run_dir)
    cfg = _cfg(modality, tmp_path, "seed=7")
    torch.manual_seed(7)
    encoder = build_model(cfg.model, modality)
    path = hf_dir if source_kind == "huggingface" else latest_checkpoint(run_dir)
    init_encoder(encoder, path, modality)
    encoder.eval()
    source, pad = _source(modality, cfg)
    with torch.no_grad():
        want = reference(source, pad)
        got = encoder(source, pad).x
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_run_from_exported_weights_starts_both_encoders_there_at_step_zero(exported, tmp_path):
    run_dir, hf_dir = exported["image"]
    reference = load_encoder(run_dir).encoder.state_dict()
    # lr 0: the one update leaves the weights where init_from put them.
    out = train(_cfg("image", tmp_path, f"model.init_from={hf_dir}", "train.max_steps=1",
                     "optim.lr=0.0", "seed=5"))
    assert out["step"] == 1
    state = load_checkpoint(tmp_path / "checkpoint_00000001.pt")
    for name, want in reference.items():
        assert torch.equal(state["model"][f"encoder.{name}"], want), name
        assert torch.equal(state["teacher"][name], want), name
    fresh_head = load_checkpoint(latest_checkpoint(run_dir))["model"]
    assert not torch.equal(state["model"]["head.weight"], fresh_head["head.weight"])
    assert state["scheduler"]["last_epoch"] == 1


def test_init_from_with_resume_is_a_config_error(exported, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        _cfg("image", tmp_path, f"model.init_from={exported['image'][1]}", "train.resume=true")


def test_mismatches_name_the_parameter(exported, tmp_path):
    _, hf_dir = exported["image"]
    cfg = _cfg("image", tmp_path, "model.embed_dim=32")
    with pytest.raises(CheckpointError, match=r"parameter '.*' .*shape"):
        init_encoder(build_model(cfg.model, "image"), hf_dir, "image")
    with pytest.raises(CheckpointError, match="blocks.blocks.4"):
        deeper = _cfg("image", tmp_path, "model.depth=5")
        init_encoder(build_model(deeper.model, "image"), hf_dir, "image")
    with pytest.raises(CheckpointError, match="no place"):
        shallower = _cfg("image", tmp_path, "model.depth=3", "objective.top_k=3")
        init_encoder(build_model(shallower.model, "image"), hf_dir, "image")
    audio = _cfg("audio", tmp_path)
    with pytest.raises(ConfigError, match="data2vec-vision"):
        init_encoder(build_model(audio.model, "audio"), hf_dir, "audio")
    with pytest.raises(ConfigError, match="not found"):
        init_encoder(build_model(audio.model, "audio"), tmp_path / "nothing", "audio")
