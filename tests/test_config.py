from pathlib import Path

import pytest

from d2v_engine.config import Config, load_config
from d2v_engine.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.objective.top_k <= cfg.model.depth


def test_override_sets_typed_values():
    cfg = load_config(None, ["model.depth=4", "objective.top_k=2", "optim.betas=[0.9, 0.95]",
                             "objective.loss_scale=null", "train.resume=true", "optim.lr=3e-4"])
    assert cfg.model.depth == 4 and cfg.objective.top_k == 2
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.objective.loss_scale is None
    assert cfg.train.resume is True
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_unknown_key_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.embed_dimm=64"])
    msg = str(e.value)
    assert "model.embed_dimm" in msg and "embed_dim" in msg


def test_unknown_top_level_key_in_yaml_names_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modality: image\nmodell: {depth: 2}\n")
    with pytest.raises(ConfigError, match="'modell'"):
        load_config(p)


def test_value_outside_choices_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.layer_norm=batch"])
    assert "objective.layer_norm" in str(e.value) and "'instance'" in str(e.value)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match="model.depth.*int"):
        load_config(None, ["model.depth=deep"])
    with pytest.raises(ConfigError, match="train.resume"):
        load_config(None, ["train.resume=maybe"])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  depth: 2\n   heads: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line" in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["model.depth"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="objective.top_k"):
        load_config(None, ["model.depth=2", "objective.top_k=3"])
    with pytest.raises(ConfigError, match="model.num_heads"):
        load_config(None, ["model.embed_dim=100", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="masking.replace"):
        load_config(None, ["masking.replace=[0.5, 0.1, 0.1]"])
