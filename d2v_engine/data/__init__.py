"""Datasets of the three modalities behind one interface (see each module for its file format).

    dataset = build_dataset(cfg.data, cfg.modality, split="train")
    len(dataset); dataset.num_labels; dataset.describe()
    sample = dataset.load(index, rng)       # {"source": tensor, "label": int when labelled}
    batch = dataset.collate(samples)        # {"source", "padding_mask" (or None), "label"?}

All randomness comes from the numpy Generator `rng` of each sample's load, and only when
data.augment is true; collate draws nothing (its `rng` argument is accepted and unused), so a
sample's augmentation does not depend on its batch-mates. A file
that cannot be decoded raises DataError, or BadSample (a DataError carrying `.path`) when
data.on_bad_file is "skip": the loader catches BadSample, counts it and draws another index.
"""
from __future__ import annotations

from pathlib import Path

from d2v_engine.config import DataConfig
from d2v_engine.data.audio import AudioManifestDataset
from d2v_engine.data.common import BadSample
from d2v_engine.data.images import ImageFolderDataset
from d2v_engine.data.text import TokenDataset
from d2v_engine.errors import ConfigError, DataError

__all__ = [
    "AudioManifestDataset", "BadSample", "ImageFolderDataset", "TokenDataset", "build_dataset",
]


def build_dataset(data_cfg: DataConfig, modality: str, split: str = "train"):
    """The dataset at data.path: an image folder, an audio manifest or a text folder.

    Image folders have no splits (point data.path at the split's folder); a folder written by
    `d2v-prepare image` (or its .tsv list) has. Audio and text use `split` unless data.path is a
    manifest file.
    """
    if not data_cfg.path:
        raise ConfigError("config key 'data.path': empty; set it to the data folder or manifest")
    path = Path(data_cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path not found: {path}")
    if modality == "image":
        prepared = path / f"{split}.tsv"  # a folder `d2v-prepare image` wrote
        return ImageFolderDataset(data_cfg, prepared if prepared.is_file() else path)
    if modality == "audio":
        return AudioManifestDataset(data_cfg, path / f"{split}.tsv" if path.is_dir() else path)
    if modality == "text":
        return TokenDataset(data_cfg, path, split)
    raise ConfigError(f"modality '{modality}': expected one of 'image', 'audio', 'text'")
