"""Export the student encoder of a run as a Hugging Face transformers model directory.

    d2v-export RUN_DIR_OR_CHECKPOINT OUT_DIR [--tokenizer TOKENIZER_JSON]

writes OUT_DIR/config.json + model.safetensors (save_pretrained) of type Data2VecVision,
Data2VecAudio or Data2VecText, the processor of the modality (d2v_engine.handoff.export_processors: feature
extractor, image processor or tokenizer, as our loader's eval path makes inputs) and a README.md
model card (d2v_engine.handoff.model_card). `transformers.AutoModel.from_pretrained(OUT_DIR)` then gives a
model whose last_hidden_state equals our encoder's output (eval mode, fp32):

    image: pixel_values B x 3 x H x W (already normalized as our data pipeline does); CLS first.
    audio: input_values B x L (normalized waveform), attention_mask B x L (1 = keep) for padding.
    text:  input_ids B x T, attention_mask B x T (1 = keep) where padded.

A feature of our architecture that the Hugging Face config cannot express is a ConfigError naming
the config key. The data2vec 2.0 image encoder (post-LN) has no transformers class: it is written
with its own modeling file (d2v_engine.handoff.export_remote; load with trust_remote_code=True). `load_encoder(checkpoint)` rebuilds our own encoder (eval mode) for comparisons and
the linear probe.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from d2v_engine.checkpoint import latest_checkpoint, load_checkpoint
from d2v_engine.config import Config, _merge, validate
from d2v_engine.errors import CheckpointError, ConfigError
from d2v_engine.handoff.export_remote import export_remote, needs_remote_code
from d2v_engine.models import build_model



# ----------------------------------------------------------------------------------------------
# checkpoint -> our encoder


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest complete checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (checkpoint_<step>.pt)")
        return ckpt
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def config_from_checkpoint(state: dict, where: Path | str = "checkpoint") -> Config:
    """The run's Config from a checkpoint's "config" dict (dataclasses.asdict of Config)."""
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{where} is not a d2v-engine checkpoint (no 'config'/'model')")
    cfg = Config()
    _merge(cfg, state["config"], "")
    validate(cfg)
    return cfg


def encoder_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The student encoder's parameters (prefix "encoder." of Data2Vec's state_dict), unprefixed."""
    out = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if not out:
        raise CheckpointError("checkpoint's model state has no 'encoder.' parameters")
    return out


class EncoderForExport(nn.Module):
    """Our encoder with Hugging Face's output: forward -> last hidden states B x T' x C."""

    def __init__(self, encoder: nn.Module, cfg: Config):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.modality = encoder.modality
        self.num_extra_tokens = encoder.num_extra_tokens

    def forward(self, source, padding_mask=None) -> torch.Tensor:
        return self.encoder(source, padding_mask).x

    def encode_with_padding(self, source, padding_mask=None):
        """(B x T' x C hidden states, B x T' bool padding mask or None) for pooling."""
        out = self.encoder(source, padding_mask)
        return out.x, out.padding_mask


def _load(checkpoint) -> tuple[Config, dict, Path]:
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    return config_from_checkpoint(state, path), state, path


def load_encoder(checkpoint: str | Path, random_init: bool = False) -> EncoderForExport:
    """Our student encoder (eval mode) from a checkpoint file or run directory.

    random_init=True builds the same architecture with the run's initial weights instead
    (torch.manual_seed(cfg.seed) before build_model, as the trainer does).
    """
    cfg, state, path = _load(checkpoint)
    torch.manual_seed(cfg.seed)
    encoder = build_model(cfg.model, cfg.modality)
    if not random_init:
        missing, unexpected = encoder.load_state_dict(encoder_state_dict(state), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: encoder weights do not fit the config's architecture "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    wrapper = EncoderForExport(encoder, cfg)
    wrapper.checkpoint_path = path
    wrapper.step = int(state.get("step", 0))
    return wrapper.eval()


# ----------------------------------------------------------------------------------------------
# our names -> Hugging Face names


def _ln_eps(encoder: nn.Module) -> float:
    eps = {m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ConfigError(f"layer norms with different eps {sorted(eps)} cannot be exported")
    return eps.pop()


def _block_names(i: int, modality: str) -> dict[str, str]:
    """Our blocks.blocks.{i}.* parameter names -> HF names (without the .weight/.bias suffix)."""
    if modality == "audio":
        p = f"encoder.layers.{i}."
        return {"attn.q_proj": p + "attention.q_proj", "attn.k_proj": p + "attention.k_proj",
                "attn.v_proj": p + "attention.v_proj", "attn.out_proj": p + "attention.out_proj",
                "attn_norm": p + "layer_norm", "fc1": p + "feed_forward.intermediate_dense",
                "fc2": p + "feed_forward.output_dense", "ffn_norm": p + "final_layer_norm"}
    if modality == "image":
        p = f"encoder.layer.{i}."
        return {"attn.q_proj": p + "attention.attention.query",
                "attn.k_proj": p + "attention.attention.key",
                "attn.v_proj": p + "attention.attention.value",
                "attn.out_proj": p + "attention.output.dense",
                "attn_norm": p + "layernorm_before", "ffn_norm": p + "layernorm_after",
                "fc1": p + "intermediate.dense", "fc2": p + "output.dense",
                "gamma_1": p + "lambda_1", "gamma_2": p + "lambda_2"}
    p = f"encoder.layer.{i}."
    return {"attn.q_proj": p + "attention.self.query", "attn.k_proj": p + "attention.self.key",
            "attn.v_proj": p + "attention.self.value", "attn.out_proj": p + "attention.output.dense",
            "attn_norm": p + "attention.output.LayerNorm", "fc1": p + "intermediate.dense",
            "fc2": p + "output.dense", "ffn_norm": p + "output.LayerNorm"}


_TOP_LEVEL = {
    "audio": {"feature_norm": "feature_projection.layer_norm",
              "feature_proj": "feature_projection.projection",
              "mask_emb": "masked_spec_embed", "norm": "encoder.layer_norm"},
    "image": {"patch_embed": "embeddings.patch_embeddings.projection",
              "cls_token": "embeddings.cls_token", "mask_emb": "embeddings.mask_token",
              "pos_embed": "embeddings.position_embeddings",
              "rel_pos_bias.table": "encoder.relative_position_bias.relative_position_bias_table",
              "norm": "layernorm"},
    "text": {"embed_tokens": "embeddings.word_embeddings",
             "embed_positions": "embeddings.position_embeddings",
             "embed_norm": "embeddings.LayerNorm"},
}


def hf_name(name: str, modality: str) -> str | None:
    """Our encoder parameter name -> Hugging Face's; None for parameters HF has no use for."""
    parts = name.split(".")
    if parts[0] == "blocks" and parts[1] == "blocks":
        i, rest = int(parts[2]), ".".join(parts[3:])
        for ours, theirs in _block_names(i, modality).items():
            if rest == ours or rest.startswith(ours + "."):
                if modality != "image" and ours.startswith("gamma_"):
                    return None  # post-LN blocks never apply layer scale
                return theirs + rest[len(ours):]
        if rest.startswith("gamma_"):
            return None
        raise ConfigError(f"export: no Hugging Face name for {modality} parameter {name!r}")
    if modality == "audio":
        if parts[0] == "feature_extractor":  # feature_extractor.{convs,norms}.{i}.{weight,bias}
            kind = {"convs": "conv", "norms": "layer_norm"}[parts[1]]
            return f"feature_extractor.conv_layers.{parts[2]}.{kind}.{parts[3]}"
        if parts[0] == "pos_conv":  # pos_conv.convs.{i}.{weight,bias}
            return f"encoder.pos_conv_embed.layers.{parts[2]}.conv.{parts[3]}"
    for ours, theirs in _TOP_LEVEL[modality].items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise ConfigError(f"export: no Hugging Face name for {modality} parameter {name!r}")


def hf_config(cfg: Config, encoder: nn.Module):
    """The transformers config of the same architecture; ConfigError for what it cannot express."""
    import transformers

    m = cfg.model
    eps = _ln_eps(encoder)
    common = dict(hidden_size=m.embed_dim, num_hidden_layers=m.depth,
                  num_attention_heads=m.num_heads, intermediate_size=m.ffn_dim, hidden_act="gelu",
                  layer_norm_eps=eps, initializer_range=0.02)
    if cfg.modality == "audio":
        if m.layer_norm_first:
            raise ConfigError("config key 'model.layer_norm_first': true (pre-LN audio blocks) "
                              "cannot be exported: Hugging Face Data2VecAudio is post-LN only")
        kernel = encoder.pos_conv.kernel
        return transformers.Data2VecAudioConfig(
            **common,
            hidden_dropout=m.dropout, attention_dropout=m.attention_dropout,
            activation_dropout=m.activation_dropout, feat_proj_dropout=m.encoder_dropout_input,
            final_dropout=0.0, layerdrop=m.layerdrop,
            feat_extract_activation="gelu",
            conv_dim=[c for c, _, _ in m.conv_layers], conv_kernel=[k for _, k, _ in m.conv_layers],
            conv_stride=[s for _, _, s in m.conv_layers], conv_bias=m.conv_bias,
            num_conv_pos_embeddings=m.conv_pos_depth, conv_pos_kernel_size=kernel,
            num_conv_pos_embedding_groups=m.conv_pos_groups,
            # HF's fine-tuning SpecAugment defaults (mask_time_prob > 0 keeps masked_spec_embed,
            # which carries our mask embedding); they act only in training mode.
        )
    if cfg.modality == "image":
        if not m.layer_norm_first:
            raise ConfigError("config key 'model.layer_norm_first': false (data2vec 2.0's post-LN "
                              "image encoder) is not Hugging Face Data2VecVision (pre-LN BEiT); "
                              "d2v_engine.handoff.export writes it with its own modeling file "
                              "(d2v_engine.handoff.export_remote)")
        return transformers.Data2VecVisionConfig(
            **common,
            hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
            image_size=m.img_size, patch_size=m.patch_size, num_channels=m.in_chans,
            use_mask_token=True,
            use_absolute_position_embeddings=not m.rel_pos_bias,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=m.rel_pos_bias,
            layer_scale_init_value=m.layer_scale_init,
            drop_path_rate=m.drop_path,
            use_mean_pooling=False,  # keeps the final LayerNorm on every token (our self.norm)
        )
    if cfg.modality == "text":
        if m.layer_norm_first:
            raise ConfigError("config key 'model.layer_norm_first': true (pre-LN text blocks with a "
                              "final norm) cannot be exported: Hugging Face Data2VecText is post-LN")
        return transformers.Data2VecTextConfig(
            **common,
            vocab_size=m.vocab_size,
            hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
            max_position_embeddings=m.max_positions + m.pad_id + 1,
            type_vocab_size=1, pad_token_id=m.pad_id,
            bos_token_id=0, eos_token_id=2,
        )
    raise ConfigError(f"config key 'modality': cannot export {cfg.modality!r}")


def to_hf_model(wrapper: EncoderForExport):
    """A transformers Data2Vec*Model (eval mode) carrying our encoder's weights."""
    import transformers

    cfg, encoder = wrapper.cfg, wrapper.encoder
    config = hf_config(cfg, encoder)
    model_cls = {"audio": transformers.Data2VecAudioModel, "image": transformers.Data2VecVisionModel,
                 "text": transformers.Data2VecTextModel}[cfg.modality]
    torch.manual_seed(0)  # HF-only parameters (text pooler) get a reproducible init
    model = model_cls(config)
    ours = {}
    for name, tensor in encoder.state_dict().items():
        target = hf_name(name, cfg.modality)
        if target is not None:
            ours[target] = tensor.detach().clone()
    if cfg.modality == "text":
        ours["embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.model.embed_dim)
    theirs = model.state_dict()
    extra = sorted(set(ours) - set(theirs))
    if extra:
        raise ConfigError(f"export: Hugging Face {model_cls.__name__} has no parameters {extra[:5]}")
    for k, v in ours.items():
        if theirs[k].shape != v.shape:
            raise ConfigError(f"export: {k}: Hugging Face expects {tuple(theirs[k].shape)}, ours is "
                              f"{tuple(v.shape)}")
    missing = [k for k in theirs if k not in ours and not k.startswith("pooler.")]
    if missing:
        raise ConfigError(f"export: no weights of ours for Hugging Face parameters {missing[:5]}")
    model.load_state_dict(ours, strict=False)
    return model.eval()


def export(checkpoint: str | Path, out_dir: str | Path,
           tokenizer_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Writes the student encoder of `checkpoint` (file or run dir), its processor and model card
    to out_dir; returns out_dir. Text: the tokenizer is tokenizer_file, else data.path's.

    The export is written beside out_dir first and moved in file by file: a failed export leaves
    out_dir as it was. A non-empty out_dir is refused (naming what it would replace) unless
    `overwrite`, and then only the export's own files are replaced; nothing else is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export: {out_dir} is a file, not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp:
        _write_export(checkpoint, Path(tmp), out_dir, tokenizer_file)
        _move_into(Path(tmp), out_dir, overwrite)
    return out_dir


def _write_export(checkpoint, into: Path, out_dir: Path, tokenizer_file) -> None:
    from d2v_engine.handoff.export_processors import build_processor, save_processor
    from d2v_engine.handoff.model_card import write_model_card

    wrapper = load_encoder(checkpoint)
    if needs_remote_code(wrapper.cfg):
        export_remote(wrapper, into)
        return
    model = to_hf_model(wrapper)
    processor, facts = build_processor(wrapper.cfg, tokenizer_file)  # checked before writing
    model.save_pretrained(into, safe_serialization=True)
    save_processor(wrapper.cfg, processor, into)
    command = " ".join(["d2v-export", str(checkpoint), str(out_dir)]
                       + (["--tokenizer", str(tokenizer_file)] if tokenizer_file else []))
    write_model_card(into, wrapper.cfg, wrapper.checkpoint_path, wrapper.step,
                     sum(p.numel() for p in model.parameters()), facts, command)


def _move_into(written: Path, out_dir: Path, overwrite: bool) -> None:
    ours = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    held = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) if out_dir.is_dir() else []
    if held and not overwrite:
        replaced = [str(p) for p in ours if p in held]
        raise ConfigError(
            f"export: {out_dir} is not empty ({len(held)} entries, e.g. "
            f"{', '.join(str(p) for p in held[:3])}); the export would replace "
            f"{', '.join(replaced) if replaced else 'none of them'}: choose an empty folder, or "
            f"pass --overwrite (only the export's own files are replaced)")
    for rel in ours:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(written / rel, out_dir / rel)
