"""The data2vec 2.0 objective (objective.mode: v2), modality-agnostic.

Per micro-batch of B samples:
  1. the feature encoder runs once per sample; its output is cloned M = objective.clone_batch
     times (rows b * M + m), and clone m of sample b gets its own mask, seeded from the sample's
     seed (the trainer's (run seed, step, position)) by d2v_kernels.masking.clone_seeds;
  2. masks have the same masked count in every row: images inverse block masks (exact count),
     mask_length 1 random masks (exact count, then the batch's smallest), longer spans fairseq's
     require_same_masks rule. The masks choose among real tokens only: padding stays visible and
     is excluded from attention through the gathered padding mask (d2v_engine/models/visible.py);
  3. the student's context encoder runs on the visible tokens only (B*M x V);
  4. the decoder input is the visible encodings scattered back to their positions, N(0,
     mask_noise_std) noise at the masked ones (zeros at padded ones); the conv decoder
     (d2v_engine/models/decoder.py) predicts the targets, compared at the masked positions only;
  5. the teacher (EMA, eval, no grad) encodes each sample once, unmasked; its top-K block outputs,
     normalized per layer and averaged (d2v_kernels.targets), serve all M clones. Under ema_scope
     transformer / context it starts from the student's local features of step 1 (fairseq's
     local_features: text's embedding dropout included), under "all" it embeds the input itself;
  6. loss: L2 (or smooth L1 with loss_beta) summed over channels, times loss_scale (default
     1/sqrt(C)), summed over the masked positions of every clone. The trainer divides by the
     masked count of the global batch. The image CLS loss (objective.cls_loss) compares the
     student's CLS output with the mean target over positions, per clone, and is added as
     cls_loss * (this micro-batch's masked count) * sum over clones, as fairseq does, so that after
     the trainer's division it weighs cls_loss per clone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2v_engine.config import Config
from d2v_engine.objective.ema import teacher_reads_student_features
from d2v_engine.objective.step import StepOutput, group_mask_count, teacher_may_skip_padding
from d2v_engine.models.decoder import ConvDecoder
from d2v_engine.models.visible import (
    encode_visible, gather_tokens, row_count_range, scatter_tokens, split_indices,
)
from d2v_kernels.masking import block_mask, clone_seeds, random_mask, span_mask
from d2v_kernels.targets import teacher_targets


def build_decoder(cfg: Config, encoder: nn.Module) -> ConvDecoder:
    o = cfg.objective
    grid = None
    if cfg.modality == "image":
        grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    return ConvDecoder(encoder.embed_dim, o.decoder_dim, o.decoder_kernel, o.decoder_groups,
                       o.decoder_layers, residual=o.decoder_residual,
                       projection_layers=o.decoder_projection_layers,
                       projection_ratio=o.decoder_projection_ratio, grid=grid)


class Data2VecV2(nn.Module):
    """Student encoder + conv decoder; the forward computes one micro-batch's loss."""

    def __init__(self, cfg: Config, encoder: nn.Module, special_ids: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = build_decoder(cfg, encoder)
        self.special_ids = special_ids or {}
        # The student never sees a mask embedding (masked tokens are dropped, audio zeroes them as
        # fairseq's encoder_zero_mask): frozen, it stays out of the optimizer and of DDP's
        # unused-parameter check.
        if getattr(encoder, "mask_emb", None) is not None:
            encoder.mask_emb.requires_grad_(False)

    def make_masks(self, seeds: torch.Tensor, padding_mask, num_tokens: int,
                   group_seeds=None) -> torch.Tensor:
        """B*M x T bool masks (True = masked), the same masked count in every row: for audio
        spans, the count of the rows' crop group (group_seeds: its samples' seeds, cloned alike)."""
        cfg, m = self.cfg, self.cfg.masking
        rows, device = seeds.shape[0], seeds.device
        if cfg.modality == "image":
            side = cfg.model.img_size // cfg.model.patch_size
            return block_mask(rows, (side, side), m.mask_prob, seed=seeds, inverse=True,
                              inverse_length=m.mask_length, inverse_adjust=m.mask_prob_adjust,
                              device=device)
        if m.mask_length == 1:
            eligible = torch.ones(rows, num_tokens, dtype=torch.bool, device=device) \
                if padding_mask is None else ~padding_mask
            return random_mask(eligible, m.mask_prob, seed=seeds, same_count=True)
        same = None
        if padding_mask is None:
            lengths = torch.full((rows,), num_tokens, dtype=torch.long, device=device)
            if group_seeds is not None:
                same = group_mask_count(clone_seeds(group_seeds, cfg.objective.clone_batch),
                                        num_tokens, m)
        else:
            lengths = (~padding_mask).sum(1)
        return span_mask(lengths, num_tokens, m.mask_prob, m.mask_length, min_masks=m.min_masks,
                         seed=seeds, require_same_masks=True, same_count=same)

    def decoder_input(self, visible: torch.Tensor, keep, num_tokens: int,
                      padding_mask=None) -> torch.Tensor:
        """B*M x V x C visible encodings -> B*M x T x C: noise at masked positions, 0 at padding."""
        o = self.cfg.objective
        visible = F.dropout(visible, o.decoder_input_dropout, self.training)
        rows, c = visible.shape[0], visible.shape[-1]
        fill = visible.new_empty(rows, num_tokens, c)
        fill.normal_(0.0, o.mask_noise_std)
        x = scatter_tokens(visible, keep, fill)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        return x

    def draw_masks(self, batch: dict, seeds: torch.Tensor) -> dict:
        """{"mask": B*M x T bool, "row_counts": [min, max] per-row masked counts}: the clones' masks from the inputs and per-sample seeds alone
        (no weights), so they can be drawn ahead of the step (d2v_engine/run/mask_ahead.py)."""
        clones = self.cfg.objective.clone_batch
        tokens, x_pad = self.encoder.token_layout(batch["source"], batch.get("padding_mask"))
        pad = None if x_pad is None else x_pad.repeat_interleave(clones, 0)
        mask = self.make_masks(clone_seeds(seeds, clones), pad, tokens, batch.get("group_seeds"))
        # The rows' shared masked count sizes the step's gathers, so the host must know it: drawn
        # ahead, d2v_engine.run.mask_ahead reads this range a step early and adds "masked_count".
        return {"mask": mask, "row_counts": row_count_range(mask)}

    def forward(self, batch: dict, teacher: nn.Module, seeds: torch.Tensor,
                masks: dict | None = None) -> StepOutput:
        """One micro-batch's loss; `masks`: draw_masks(batch, seeds) made ahead, else drawn here."""
        o = self.cfg.objective
        clones = o.clone_batch
        source, padding_mask = batch["source"], batch.get("padding_mask")
        n_extra = self.encoder.num_extra_tokens

        x, x_pad = self.encoder.embed(source, padding_mask)
        with torch.no_grad():
            if teacher_reads_student_features(o.ema_scope):
                # fairseq feeds the teacher extractor_out["local_features"]: the student's, so
                # text's embedding dropout included.
                t_x, t_pad = x.detach(), x_pad
            else:
                t_x, t_pad = teacher.embed(source, padding_mask)
            t_out = teacher.encode(t_x, t_pad, return_layers=True,
                                   skip_padded_queries=teacher_may_skip_padding(o))
            per_block = t_out.layer_results if o.layer_output == "ffn" else t_out.block_results
            layers = [y[:, n_extra:] for y in per_block[-o.top_k:]]
            targets = teacher_targets(layers, t_pad, layer_norm=o.layer_norm,
                                      final_norm=o.final_norm,
                                      instance_norm_padding=o.instance_norm_padding)

        x = x.repeat_interleave(clones, 0)
        pad = None if x_pad is None else x_pad.repeat_interleave(clones, 0)
        masks = self.draw_masks(batch, seeds) if masks is None else masks
        mask = masks["mask"]
        keep, masked_at = split_indices(mask, masks.get("masked_count"))
        # the decoder input zeroes the padded positions: attention skips their queries
        student = encode_visible(self.encoder, x, pad, mask, keep, skip_padded_queries=True)
        dec = self.decoder(self.decoder_input(student.x[:, n_extra:], keep, x.shape[1], pad))

        # Masked positions row by row (no nonzero(): its shape would cost a host sync).
        pred = gather_tokens(dec, masked_at).flatten(0, 1).float()
        sample = torch.arange(mask.shape[0], device=mask.device) // clones
        target = targets[sample[:, None], masked_at].flatten(0, 1)
        scale = o.loss_scale if o.loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
        loss_sum = self._loss(pred, target).sum() * scale
        masked = pred.new_tensor(float(masked_at.numel()))
        if o.cls_loss > 0:
            cls_target = targets.mean(dim=1).repeat_interleave(clones, 0)
            cls_pred = student.x[:, n_extra - 1].float()
            cls_sum = self._loss(cls_pred, cls_target).sum() * scale
            loss_sum = loss_sum + cls_sum * (o.cls_loss * masked.detach())
        return StepOutput(loss_sum, masked, pred.detach(), target)

    def _loss(self, pred, target):
        beta = self.cfg.objective.loss_beta
        if beta == 0:
            return F.mse_loss(pred, target, reduction="none").sum(-1)
        return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(-1)

