"""Export of an encoder that transformers has no class for, with its own modeling file.

The data2vec 2.0 image encoder (model.layer_norm_first false: post-LN blocks after an input
LayerNorm, no final norm) is not transformers' Data2VecVision (BEiT: pre-LN, final norm): exporting
it as one would load without error and compute something else. It goes out as remote code
instead: OUT_DIR holds config.json (model_type data2vec2-vision, with an auto_map),
configuration_data2vec2_vision.py, modeling_data2vec2_vision.py (d2v_engine/hf_remote; they import only
torch and transformers) and model.safetensors, and

    transformers.AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)

gives a model whose last_hidden_state equals our encoder's output (CLS first, eval mode).
"""
from __future__ import annotations

from pathlib import Path

import torch

from d2v_engine.errors import ConfigError


def needs_remote_code(cfg) -> bool:
    """True for the encoders d2v_engine.handoff.export writes with their own modeling file."""
    return cfg.modality == "image" and not cfg.model.layer_norm_first


def remote_state_dict(encoder) -> dict[str, torch.Tensor]:
    """Our post-LN image encoder's weights under the remote model's names (the mask embedding,
    which only masked pretraining inputs use, is left out)."""
    out = {}
    for name, tensor in encoder.state_dict().items():
        if name == "mask_emb":
            continue
        if name.startswith("blocks.blocks."):
            name = "blocks." + name[len("blocks.blocks."):]
        out[name] = tensor.detach().clone()
    return out


def to_remote_model(wrapper):
    """The remote-code transformers model (eval mode) carrying our post-LN image encoder."""
    from d2v_engine.handoff.hf_remote.configuration_data2vec2_vision import Data2Vec2VisionConfig
    from d2v_engine.handoff.hf_remote.modeling_data2vec2_vision import Data2Vec2VisionModel

    cfg, encoder = wrapper.cfg, wrapper.encoder
    if not needs_remote_code(cfg):
        raise ConfigError(f"export: the {cfg.modality} encoder has a transformers class; "
                          f"d2v_engine.handoff.export writes it as one")
    m = cfg.model
    eps = {mod.eps for mod in encoder.modules() if isinstance(mod, torch.nn.LayerNorm)}
    if len(eps) != 1:
        raise ConfigError(f"config key 'model.norm_eps': layer norms with different eps "
                          f"{sorted(eps)} cannot be exported")
    config = Data2Vec2VisionConfig(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=m.ffn_dim, layer_norm_eps=eps.pop(), image_size=m.img_size,
        patch_size=m.patch_size, num_channels=m.in_chans,
        use_absolute_position_embeddings=not m.rel_pos_bias,
        use_shared_relative_position_bias=m.rel_pos_bias)
    # save_pretrained then copies both source files and writes config.json's auto_map
    Data2Vec2VisionConfig.register_for_auto_class()
    Data2Vec2VisionModel.register_for_auto_class("AutoModel")
    model = Data2Vec2VisionModel(config)
    ours = remote_state_dict(encoder)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ConfigError(f"export: remote model and encoder differ (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.eval()


def export_remote(wrapper, out_dir: str | Path) -> Path:
    """Writes the post-LN image encoder with its modeling file to out_dir; returns out_dir."""
    model = to_remote_model(wrapper)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
