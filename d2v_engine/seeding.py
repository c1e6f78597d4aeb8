"""Counter-based seeds: every random choice is a pure function of (run seed, step, position, ...).

Masks, crops and dropout are seeded from these instead of from a stateful generator, so a resumed
run replays exactly the same randomness, and a sample's randomness does not depend on the world
size or on how a global batch is cut into micro-batches.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def sample_seeds(run_seed: int, step: int, positions, stream: int = 0) -> torch.Tensor:
    """int64 seed per sample from (run seed, step, position in the global batch, stream): B -> B."""
    base = mix_seed(run_seed, step, stream)
    pos = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = pos * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(1)).astype(np.int64))


# Streams keep the independent random choices of one sample apart.
STREAM_MASK = 1
STREAM_DATA = 2
STREAM_DROPOUT = 3
