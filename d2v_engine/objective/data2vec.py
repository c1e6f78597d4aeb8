"""The data2vec 1.0 objective, modality-agnostic.

The teacher (EMA of the student, eval mode, no grad) encodes the unmasked input and returns its
top-K block outputs; they are normalized and averaged into targets (d2v_kernels.targets). The student
encodes the masked input; a regression head predicts the targets at masked positions only.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from d2v_engine.config import Config
from d2v_engine.objective.ema import teacher_reads_student_features
from d2v_engine.objective.step import StepOutput, group_mask_count, teacher_may_skip_padding
from d2v_kernels.masking import block_mask, span_mask, token_mask
from d2v_kernels.targets import teacher_targets


def regression_head(dim: int, layers: int) -> nn.Module:
    """fairseq's final_proj (one Linear) or, for text v1, Linear-GELU-...-Linear with width 2C."""
    if layers <= 1:
        return nn.Linear(dim, dim)
    mods, width = [], dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, dim * 2), nn.GELU()]
        width = dim * 2
    mods.append(nn.Linear(width, dim))
    return nn.Sequential(*mods)


class Data2Vec(nn.Module):
    """Student encoder + regression head; the forward computes one micro-batch's loss."""

    def __init__(self, cfg: Config, encoder: nn.Module, special_ids: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = regression_head(encoder.embed_dim, cfg.model.head_layers)
        self.special_ids = special_ids or {}

    def make_mask(self, source, padding_mask, x_padding_mask, seeds, num_tokens,
                  group_seeds=None):
        """B x T bool mask (True = masked) over the feature tokens, seeded per sample; audio rows
        keep the masked count of their crop group (group_seeds: its G samples' seeds)."""
        m = self.cfg.masking
        batch = seeds.shape[0]
        if self.cfg.modality == "audio":
            if x_padding_mask is None:
                lengths = torch.full((batch,), num_tokens, dtype=torch.long, device=seeds.device)
            else:
                lengths = (~x_padding_mask).sum(1)
            same = None
            if m.require_same_masks and group_seeds is not None and x_padding_mask is None:
                same = group_mask_count(group_seeds, num_tokens, m)
            return span_mask(lengths, num_tokens, m.mask_prob, m.mask_length, min_masks=m.min_masks,
                             seed=seeds, require_same_masks=m.require_same_masks, same_count=same)
        side = self.cfg.model.img_size // self.cfg.model.patch_size
        return block_mask(batch, (side, side), m.mask_prob, seed=seeds, min_block=m.min_block,
                          inverse=m.inverse, device=seeds.device)

    def draw_masks(self, batch: dict, seeds: torch.Tensor) -> dict:
        """This micro-batch's masks from its inputs and per-sample seeds alone (no weights), so
        they can be drawn ahead of the step (d2v_engine/run/mask_ahead.py): {"mask": B x T bool}, and for
        text the masked ids {"source": B x T} with "mask" the positions that became <mask>."""
        cfg, m = self.cfg, self.cfg.masking
        source, padding_mask = batch["source"], batch.get("padding_mask")
        if cfg.modality == "text":
            ids = self.special_ids
            special = torch.zeros_like(source, dtype=torch.bool)
            for key in ("bos", "pad", "eos"):
                special |= source == ids[key]
            masked_source, selected = token_mask(
                source, m.mask_prob, special, ids["mask"], cfg.model.vocab_size, seed=seeds,
                span=m.mask_length, replace=tuple(m.replace),
                random_exclude=tuple(ids[k] for k in ("bos", "pad", "eos", "unk", "mask")),
            )
            # As fairseq data2vec_text: the loss is on positions whose input became <mask>; tokens
            # kept or randomly replaced only add noise to the student's input.
            return {"source": masked_source, "mask": selected & (masked_source == ids["mask"])}
        tokens, x_pad = self.encoder.token_layout(source, padding_mask)
        return {"mask": self.make_mask(source, padding_mask, x_pad, seeds, tokens,
                                      batch.get("group_seeds"))}

    def forward(self, batch: dict, teacher: nn.Module, seeds: torch.Tensor,
                masks: dict | None = None) -> StepOutput:
        """One micro-batch's loss; `masks`: draw_masks(batch, seeds) made ahead, else drawn here."""
        cfg, o = self.cfg, self.cfg.objective
        source, padding_mask = batch["source"], batch.get("padding_mask")
        n_extra = self.encoder.num_extra_tokens
        shared_features = teacher_reads_student_features(o.ema_scope)
        masks = self.draw_masks(batch, seeds) if masks is None else masks
        mask = masks["mask"]

        # The student's padded positions are never read (the loss is at masked positions, never
        # padding), so attention skips their queries.
        if cfg.modality == "text":
            x, x_pad = self.encoder.embed(masks["source"], padding_mask)
            student = self.encoder.encode(x, x_pad, skip_padded_queries=True)
            with torch.no_grad():
                t_x, t_pad = teacher.embed(source, padding_mask)
        else:
            x, x_pad = self.encoder.embed(source, padding_mask)
            student = self.encoder.encode(x, x_pad, mask=mask, skip_padded_queries=True)
            with torch.no_grad():
                if shared_features:
                    t_x, t_pad = x.detach(), x_pad
                else:
                    t_x, t_pad = teacher.embed(source, padding_mask)

        with torch.no_grad():
            t_out = teacher.encode(t_x, t_pad, return_layers=True,
                                   skip_padded_queries=teacher_may_skip_padding(o))
            per_block = t_out.layer_results if o.layer_output == "ffn" else t_out.block_results
            layers = [y[:, n_extra:] for y in per_block[-o.top_k:]]
            targets = teacher_targets(
                layers, t_pad, layer_norm=o.layer_norm, final_norm=o.final_norm,
                instance_norm_padding=o.instance_norm_padding,
            )

        # The head runs on every position and the unmasked ones are zeroed on both sides (their
        # loss and gradient are exactly 0): fairseq's hidden[mask] gather has a data-dependent
        # size, which costs a host synchronization per micro-batch. The head is one C x C layer
        # (text: two of width 2C): 0.5% of image_base's step FLOPs, 0.3% of audio_base's, 1.8% of
        # text_base's, where only 15% is masked (the gather needed 0.3%).
        at = mask[..., None]
        pred = torch.where(at, self.head(student.x[:, n_extra:]).float(), 0.0)
        target = torch.where(at, targets, 0.0)
        if o.loss_beta == 0:
            per_pos = F.mse_loss(pred, target, reduction="none").sum(-1)
        else:
            per_pos = F.smooth_l1_loss(pred, target, reduction="none", beta=o.loss_beta).sum(-1)
        scale = o.loss_scale if o.loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
        return StepOutput(per_pos.sum() * scale, mask.sum().float(), pred.detach(), target, mask)
