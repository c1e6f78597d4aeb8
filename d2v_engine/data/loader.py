"""Global-batch sampling and the plain PyTorch loader.

The run is defined by its global batch. Which samples form global batch `step` depends only on
(seed, step): epochs are permutations seeded by (seed, epoch), cut into global batches (the tail
that does not fill one is dropped). Each rank takes its micro-batches from that global batch, so
the data position of a run is its step alone and a resumed run reads exactly what an
uninterrupted one would. Every sample's augmentation is seeded by (seed, step, its position in the
global batch), and audio crops to a length fixed per crop group (d2v_engine.data.audio), so neither
depends on the world size or the micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from d2v_engine.errors import ConfigError, DataError
from d2v_engine.seeding import STREAM_DATA, mix_seed


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: world_size ranks x accumulation micro-batches x micro_batch."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int

    @staticmethod
    def make(global_batch: int, micro_batch: int, world_size: int) -> "BatchPlan":
        micro = micro_batch or max(1, global_batch // world_size)
        if global_batch % (micro * world_size):
            raise ConfigError(
                f"config key 'train.global_batch': {global_batch} is not divisible by "
                f"train.micro_batch ({micro}) x world size ({world_size})"
            )
        return BatchPlan(global_batch, micro, world_size, global_batch // (micro * world_size))


def global_batch_indices(num_samples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Dataset indices of global batch `step`: a slice of the epoch's seeded permutation."""
    per_epoch = num_samples // global_batch
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng(mix_seed(seed, epoch, 0x5EED)).permutation(num_samples)
    return perm[pos * global_batch:(pos + 1) * global_batch]


def group_positions(position: int, group: int) -> range:
    """Positions of the group of `group` consecutive positions of the global batch that holds
    `position` (audio crop groups, d2v_engine.data.audio)."""
    first = int(position) // group * group
    return range(first, first + group)


def check_crop_group(crop_group: int, plan: BatchPlan) -> None:
    """ConfigError when a micro-batch would hold parts of two crop groups (d2v_engine.planning.plan)."""
    if crop_group and (crop_group % plan.micro_batch or plan.global_batch % crop_group):
        raise ConfigError(f"config key 'data.crop_group': {crop_group} must divide the global "
                          f"batch ({plan.global_batch}) and be a multiple of the micro-batch "
                          f"({plan.micro_batch})")


class GlobalBatchSampler:
    """Yields, for every step from start_step, this rank's micro-batches as (index, step, position)."""

    def __init__(self, num_samples: int, plan: BatchPlan, rank: int, seed: int,
                 start_step: int, max_steps: int):
        if num_samples < plan.global_batch:
            raise DataError(
                f"dataset has {num_samples} samples, fewer than one global batch "
                f"(train.global_batch={plan.global_batch})"
            )
        self.num_samples, self.plan, self.rank = num_samples, plan, rank
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.plan.accumulation

    def __iter__(self):
        p = self.plan
        for step in range(self.start_step, self.max_steps):
            batch = global_batch_indices(self.num_samples, p.global_batch, self.seed, step)
            for micro in range(p.accumulation):
                first = (micro * p.world_size + self.rank) * p.micro_batch
                yield [(int(batch[i]), step, i) for i in range(first, first + p.micro_batch)]


class _Keyed(torch.utils.data.Dataset):
    """Adapts a dataset's load(index, rng) to sampler keys; bad samples become None when skipping."""

    def __init__(self, dataset, seed: int, skip_bad: bool):
        self.dataset, self.seed, self.skip_bad = dataset, seed, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, step, position = key
        rng = np.random.default_rng(mix_seed(self.seed, step, position, STREAM_DATA))
        try:
            sample = self.dataset.load(index, rng)
        except DataError as e:
            if not self.skip_bad or not hasattr(e, "path"):
                raise
            return {"bad": str(e.path), "position": position, "step": step}
        sample["position"] = position
        sample["step"] = step
        return sample


class _Collate:
    def __init__(self, dataset, seed: int, global_batch: int, crop_group: int):
        self.dataset, self.seed = dataset, seed
        self.global_batch, self.crop_group = global_batch, crop_group

    def crop_length(self, step: int, position: int) -> int:
        """Audio: the length of the crop group holding `position` (d2v_engine.data.audio)."""
        indices = global_batch_indices(len(self.dataset), self.global_batch, self.seed, step)
        return self.dataset.crop_length(indices[list(group_positions(position, self.crop_group))])

    def __call__(self, samples):
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        step = samples[0]["step"]
        crop = {"length": self.crop_length(step, samples[0]["position"])} \
            if self.crop_group and good else {}
        batch = self.dataset.collate(good, **crop) if good else {}
        batch["position"] = torch.tensor([s["position"] for s in good], dtype=torch.long)
        batch["step"] = step
        batch["bad_files"] = bad
        return batch


def make_loader(dataset, plan: BatchPlan, rank: int, seed: int, start_step: int, max_steps: int,
                num_workers: int = 0, skip_bad: bool = False, crop_group: int = 0) -> DataLoader:
    """A DataLoader over this rank's micro-batches of steps start_step .. max_steps - 1; audio
    micro-batches cropped to their crop group's length when crop_group (d2v_engine.data.audio)."""
    check_crop_group(crop_group, plan)
    sampler = GlobalBatchSampler(len(dataset), plan, rank, seed, start_step, max_steps)
    return DataLoader(
        _Keyed(dataset, seed, skip_bad),
        batch_sampler=sampler,
        collate_fn=_Collate(dataset, seed, plan.global_batch, crop_group),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
