"""The step's precision: bf16 autocast on CUDA unless train.precision says otherwise."""
from __future__ import annotations

import contextlib

import torch


def use_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """The forward's context: bf16 autocast, or nothing (fp32)."""
    if not use_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def describe_precision(device: torch.device, precision: str) -> str:
    """The precision in use, in words, with the train.precision that chose it."""
    used = "bf16 autocast" if use_bf16(device, precision) else "fp32"
    return f"{used} (train.precision={precision})"
