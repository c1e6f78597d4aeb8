"""Which loader feeds the run (data.loader: auto | dali | torch), and building it.

auto: DALI for images and audio when nvidia.dali is importable, else the torch DataLoader. Text is
always the torch DataLoader over the memory-mapped token file: there is nothing to decode.
Both loaders yield the same micro-batch dicts from the same sampler and the same random draws.
"""
from __future__ import annotations

import torch

from d2v_engine.config import DataConfig
from d2v_engine.data.audio import crop_group_size
from d2v_engine.data.dali_common import dali_available
from d2v_engine.data.loader import BatchPlan, make_loader
from d2v_engine.errors import ConfigError

DALI_MODALITIES = ("image", "audio")


def choose_loader(data_cfg: DataConfig, modality: str) -> str:
    """"dali" or "torch" for this config; ConfigError when DALI is asked for and cannot run."""
    wanted = data_cfg.loader
    if wanted == "torch":
        return "torch"
    if modality not in DALI_MODALITIES:
        if wanted == "dali":
            raise ConfigError(f"config key 'data.loader': 'dali' loads images and audio only; "
                              f"use 'auto' or 'torch' for {modality}")
        return "torch"
    if dali_available():
        return "dali"
    if wanted == "dali":
        raise ConfigError("config key 'data.loader': 'dali' but nvidia.dali is not installed "
                          "(pip install nvidia-dali-cuda130, or use 'auto' / 'torch')")
    return "torch"


def describe_loader(kind: str, data_cfg: DataConfig, device: torch.device,
                    cpus: list[int] | None = None) -> str:
    """One line for the start-up banner: which loader, where it decodes, how many threads (and,
    with `cpus`, that DALI pins them there)."""
    workers = data_cfg.num_workers
    if kind == "dali":
        where = "GPU (nvJPEG, mixed)" if device.type == "cuda" else "CPU"
        pinned = " pinned to this rank's CPUs (DALI_AFFINITY_MASK)" if cpus else ""
        return f"DALI decoding on {where}, {workers or torch.get_num_threads()} threads{pinned}"
    return f"torch DataLoader, {workers} workers" + (
        " (DALI not installed)" if data_cfg.loader == "auto" and not dali_available() else "")


def build_loader(dataset, data_cfg: DataConfig, modality: str, plan: BatchPlan, rank: int,
                 seed: int, start_step: int, max_steps: int, device: torch.device | str = "cpu",
                 kind: str | None = None, cpus: list[int] | None = None):
    """This rank's micro-batches of steps start_step .. max_steps - 1 from the chosen loader;
    `cpus`: where DALI's threads go, in thread order (d2v_engine.runtime.cpu_setup.dali_cpus)."""
    kind = kind or choose_loader(data_cfg, modality)
    skip_bad = data_cfg.on_bad_file == "skip"
    crop = {"crop_group": crop_group_size(data_cfg, plan.global_batch)} \
        if modality == "audio" else {}
    if kind == "torch":
        return make_loader(dataset, plan, rank, seed, start_step, max_steps,
                           num_workers=data_cfg.num_workers, skip_bad=skip_bad, **crop)
    if modality == "image":
        from d2v_engine.data.dali_images import DaliImageLoader as Loader
    else:
        from d2v_engine.data.dali_audio import DaliAudioLoader as Loader
    return Loader(dataset, plan, rank, seed, start_step, max_steps,
                  num_threads=data_cfg.num_workers, skip_bad=skip_bad, device=device, cpus=cpus,
                  **crop)
