"""What both objectives share: the micro-batch's output, the logged variance, and the crop group's
masked count (data2vec 1.0 and 2.0 import this module; neither imports the other)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from d2v_kernels.masking import span_mask


def teacher_may_skip_padding(o) -> bool:
    """Whether the targets never read the teacher's layers at padded positions: true unless an
    instance norm counts the padded steps in its statistics (instance_norm_padding="include",
    fairseq's), so the teacher's attention may skip the padded queries."""
    return not (o.instance_norm_padding == "include"
                and "instance" in (o.layer_norm, o.final_norm))


@dataclass
class StepOutput:
    """One micro-batch's loss_sum (the scaled loss summed over masked positions, normalized by the
    trainer) and masked count (float); `pred` / `target` are the student's predictions (detached)
    and the teacher's targets at the masked positions (M x C), for the logged variances.

    v1 stores them B x T x C with `at`, the B x T mask: the rows are gathered only when read (on
    logged steps), because a boolean gather's size is data-dependent and would make every step
    wait for the device. A dataclass, so that DDP finds the loss in the forward's output."""

    loss_sum: torch.Tensor
    masked: torch.Tensor
    predictions: torch.Tensor  # M x C, or B x T x C read at `at`
    targets: torch.Tensor
    at: Optional[torch.Tensor] = None

    @property
    def pred(self) -> torch.Tensor:
        return self.predictions if self.at is None else self.predictions[self.at]

    @property
    def target(self) -> torch.Tensor:
        return self.targets if self.at is None else self.targets[self.at]


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """fairseq's compute_var: std over positions per channel, averaged over channels (M x C)."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.float().var(dim=0) + 1e-6).mean()


def group_mask_count(group_seeds: torch.Tensor, num_tokens: int, m) -> torch.Tensor:
    """The smallest span-masked count (0-d int64) among a crop group's samples, all of
    `num_tokens` frames: fairseq's require_same_masks count for the group, which the rows of any
    micro-batch cut from it keep (d2v_engine.data.audio). A group's mask draws depend only on each
    sample's seed and length, so no other sample's data is needed."""
    full = torch.full((group_seeds.shape[0],), num_tokens, dtype=torch.long,
                      device=group_seeds.device)
    return span_mask(full, num_tokens, m.mask_prob, m.mask_length, min_masks=m.min_masks,
                     seed=group_seeds).sum(1).min()
