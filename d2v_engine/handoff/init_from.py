"""model.init_from: start a new run's encoders from released or earlier weights.

PATH is one of
- a Hugging Face transformers Data2Vec{Vision,Audio,Text} directory (config.json + model.safetensors,
  sharded safetensors or pytorch_model.bin), as `d2v_engine.handoff.export` writes it and as the released
  models are published; names are mapped back through d2v_engine.handoff.export.hf_name;
- one of our run directories (its newest checkpoint) or checkpoint files: the student encoder.

Only the encoder is loaded; the regression head starts fresh and the run starts at step 0 with a new
schedule (the trainer builds the EMA teacher as a copy of the loaded student). Every parameter of
our encoder must be found with its shape, and every weight of the file must have a place: a
mismatch is a CheckpointError naming the parameter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from d2v_engine.checkpoint import error_line, load_checkpoint
from d2v_engine.errors import CheckpointError, ConfigError

HF_MODEL_TYPES = {"data2vec-audio": "audio", "data2vec-vision": "image", "data2vec-text": "text"}
HF_PREFIXES = ("data2vec_audio.", "data2vec_vision.", "data2vec_text.")
# Hugging Face weights our encoder has no use for: the text pooler (fine-tuning only), buffers.
HF_UNUSED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")


def _shards(index: Path) -> list[Path]:
    """The shard files a model.safetensors.index.json names: plain names inside its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as e:
        raise CheckpointError(f"model.init_from={index}: not a safetensors index with a "
                              f"weight_map ({type(e).__name__}: {e})") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"model.init_from={index}: shard names must be file names in its "
                              f"folder, got {bad[:3]}")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"model.init_from={index}: names shards that are not there: "
                              f"{missing[:3]}")
    return [index.parent / n for n in names]


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        from safetensors.torch import load_file

        files = [single] if single.is_file() else _shards(index)
        out = {}
        for path in files:
            try:
                out.update(load_file(str(path)))
            except Exception as e:  # safetensors' own errors: a truncated or damaged file
                raise CheckpointError(f"model.init_from={path}: not a readable safetensors file "
                                      f"({str(e).splitlines()[0][:200]})") from None
        return out
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # refused globals or a damaged file: one line, nothing ran
            raise CheckpointError(f"model.init_from={legacy}: refused or unreadable "
                                  f"({error_line(e, 'Unsupported')})") from None
    raise CheckpointError(f"model.init_from={folder}: no model.safetensors or pytorch_model.bin")


def hf_encoder_state(folder: Path, modality: str, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Our encoder's state_dict filled from a Hugging Face Data2Vec* directory."""
    from d2v_engine.handoff.export import hf_name

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"model.init_from={folder}: cannot read config.json ({e})") from None
    model_type = config.get("model_type")
    if HF_MODEL_TYPES.get(model_type) != modality:
        raise ConfigError(f"config key 'model.init_from': {folder} holds a {model_type!r} model; "
                          f"a {modality} run needs one of type "
                          f"{[k for k, v in HF_MODEL_TYPES.items() if v == modality][0]!r}")
    theirs = {}
    for key, value in _read_hf_weights(folder).items():
        for prefix in HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        theirs[key] = value
    state, used = {}, set()
    for name, ours in encoder.state_dict().items():
        key = hf_name(name, modality)
        if key is None:
            state[name] = ours
            continue
        if key not in theirs:
            raise CheckpointError(f"model.init_from={folder}: no weight {key!r} for our parameter "
                                  f"{name!r} (an architecture the config does not match?)")
        if tuple(theirs[key].shape) != tuple(ours.shape):
            raise CheckpointError(f"model.init_from={folder}: parameter {name!r} ({key!r}) has "
                                  f"shape {tuple(theirs[key].shape)}, the config's model needs "
                                  f"{tuple(ours.shape)}")
        state[name] = theirs[key].to(ours.dtype)
        used.add(key)
    token_type = theirs.get("embeddings.token_type_embeddings.weight")
    if modality == "text" and token_type is not None:
        # Hugging Face adds token type 0 to every token; our encoder has no token types, so it is
        # folded into the position embeddings (zero in what d2v_engine.handoff.export writes).
        used.add("embeddings.token_type_embeddings.weight")
        positions = state["embed_positions.weight"].clone()
        pad = getattr(encoder, "pad_id", None)
        keep = torch.ones(positions.shape[0], dtype=torch.bool)
        if pad is not None:
            keep[pad] = False
        positions[keep] += token_type[0].to(positions.dtype)
        state["embed_positions.weight"] = positions
    extra = sorted(k for k in theirs if k not in used and not k.startswith(HF_UNUSED))
    if extra:
        raise CheckpointError(f"model.init_from={folder}: weights with no place in our "
                              f"{modality} encoder: {extra[:5]} (an architecture the config does "
                              "not match?)")
    return state


def checkpoint_encoder_state(path: Path, modality: str, encoder: nn.Module) -> dict:
    """Our encoder's state_dict from one of our checkpoints (file or run directory)."""
    from d2v_engine.handoff.export import encoder_state_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"model.init_from={ckpt}: not a d2v-engine checkpoint")
    their_modality = (state.get("config") or {}).get("modality", modality)
    if their_modality != modality:
        raise ConfigError(f"config key 'model.init_from': {ckpt} is a {their_modality} run; this "
                          f"run is {modality}")
    theirs = encoder_state_dict(state)
    ours = encoder.state_dict()
    for name, tensor in ours.items():
        if name not in theirs:
            raise CheckpointError(f"model.init_from={ckpt}: no weight for our parameter {name!r}")
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"model.init_from={ckpt}: parameter {name!r} has shape "
                                  f"{tuple(theirs[name].shape)}, the config's model needs "
                                  f"{tuple(tensor.shape)}")
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise CheckpointError(f"model.init_from={ckpt}: weights with no place in our encoder: "
                              f"{extra[:5]}")
    return {name: theirs[name].to(t.dtype) for name, t in ours.items()}


def init_encoder(encoder: nn.Module, path: str | Path, modality: str) -> None:
    """Loads `path` (HF directory, run directory or checkpoint file) into `encoder` in place."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config key 'model.init_from': {path} not found")
    if path.is_dir() and (path / "config.json").is_file():
        state = hf_encoder_state(path, modality, encoder)
    else:
        state = checkpoint_encoder_state(path, modality, encoder)
    encoder.load_state_dict(state, strict=True)
