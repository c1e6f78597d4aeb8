"""One training micro-batch at the shape level, for the plan (d2v_engine.planning.flops, d2v_engine.planning.memory).

The student, its objective (v1 head or v2 decoder) and the teacher are built on the meta device;
the FLOP count runs them there, the memory plan materializes them as FakeTensorMode tensors
(dtypes and storage sizes, no data: autocast and the memory tracker work on them). No memory, no
GPU. `forward` runs what Data2Vec.forward / Data2VecV2.forward run, with the same modules
(encoder.embed / encode, encode_visible, the decoder, the head), in the same order. What depends
on values is taken out:
  - the masks are computed for real, on the CPU, by the objective's own mask functions with the
    trainer's seeds (cheap: B x T bools), so the masked / visible counts are the run's;
  - positions picked by a mask (v1's loss mask, v2's split_indices) come from those real
    masks as tensors of the same size;
  - the teacher targets go through the d2v::teacher_targets op (its fake gives the shape);
  - attention goes through the d2v::attention_* op pair (d2v_kernels.attention routes meta and fake
    tensors there): the flash kernels' saved tensors and FlashAttention's FLOP count;
  - layerdrop skips no block (a skip is a random draw; every block runs: the upper bound).
tests/test_flops.py checks that the counted FLOPs equal the real objective's on real tensors, and
tests/test_memory_plan.py that the fake step's peak equals the real step's.

Shapes: images at model.img_size; audio crops of data.max_sample_size samples (the longest crop a
batch can have: shorter batches cost less, d2v_engine.planning.flops scales by the batch's length); text blocks
of data.max_tokens.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from d2v_engine.config import Config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import teacher_reads_student_features
from d2v_engine.models import build_model
from d2v_engine.models.visible import encode_visible, gather_tokens, split_indices
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_kernels import ops
from d2v_kernels.masking import clone_seeds, token_mask

# Special token ids when the plan has no text dataset to read them from (fairseq's dictionary
# order: <s>, <pad>, </s>, <unk>; <mask> last).
DEFAULT_SPECIAL_IDS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}

Mark = Callable[[str], None]


@dataclass
class Shadow:
    cfg: Config  # the run's config, or a copy at another depth (see build_shadow)
    fake_mode: Optional[FakeTensorMode]  # None: the meta device
    model: torch.nn.Module  # Data2Vec / Data2VecV2 with the student encoder, no data
    teacher: torch.nn.Module  # the EMA teacher's encoder: eval, no grad
    special_ids: dict

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.fake_mode is not None else "meta")

    def mode(self):
        """The context the shadow's tensors are made and used in."""
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()

    def from_real(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return self.fake_mode.from_tensor(t) if self.fake_mode is not None else t.to("meta")


@dataclass
class ShadowBatch:
    """One micro-batch: fake source (and padding), real-mask-derived indices as fake tensors."""
    source: torch.Tensor
    padding_mask: Optional[torch.Tensor]
    masked_source: Optional[torch.Tensor]  # text v1: the student's ids
    mask: Optional[torch.Tensor]  # v1 image / audio: B x T bool
    loss_mask: Optional[torch.Tensor]  # v1: B x T bool, the positions the loss reads
    keep: Optional[torch.Tensor]  # v2: B*M x V visible positions
    masked_at: Optional[torch.Tensor]  # v2: B*M x (T - V) masked positions
    samples: int
    tokens: int  # T: tokens per sample through the teacher's encoder, extra tokens excluded
    visible: int  # v2: V, visible tokens per clone; v1: T


def build_shadow(cfg: Config, special_ids: Optional[dict] = None, fake: bool = True,
                 depth: Optional[int] = None) -> Shadow:
    """The run's student objective and teacher encoder without data: FakeTensorMode tensors
    (fake=True: the memory plan; they have storages and dtypes, and run under CPU autocast) or
    meta tensors (faster: the FLOP count). `depth` builds the same model with another number of
    blocks (objective.top_k capped to it): the FLOP count extrapolates from depths 1 and 2."""
    cfg = copy.deepcopy(cfg)
    cfg.model.layerdrop = 0.0  # a random skip cannot be drawn from fake values: every block runs
    if depth is not None:
        cfg.model.depth = depth
        cfg.objective.top_k = min(cfg.objective.top_k, depth)
    ids = dict(special_ids or {})
    if cfg.modality == "text" and not ids:
        ids = dict(DEFAULT_SPECIAL_IDS, mask=cfg.model.vocab_size - 1)
    with torch.device("meta"):
        encoder = build_model(cfg.model, cfg.modality)
        model = build_objective(cfg, encoder, ids)
        teacher = build_model(cfg.model, cfg.modality)
    fake_mode = None
    if fake:
        # allow_non_fake_inputs: to_empty reads the meta parameters it replaces.
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model.to_empty(device="cpu")
            teacher.to_empty(device="cpu")
    teacher.eval().requires_grad_(False)  # d2v_engine.objective.ema.EMATeacher: fp32, eval, no grad
    model.train()
    return Shadow(cfg, fake_mode, model, teacher, ids)


def tokens_per_sample(cfg: Config, length: Optional[int] = None) -> int:
    """Tokens the encoder sees per sample (extra tokens such as the image CLS excluded): image
    patches; audio frames of a `length`-sample crop (default data.max_sample_size); text tokens
    (default data.max_tokens)."""
    if cfg.modality == "image":
        return (cfg.model.img_size // cfg.model.patch_size) ** 2
    if cfg.modality == "audio":
        frames = length or cfg.data.max_sample_size
        for _, k, s in cfg.model.conv_layers:
            frames = (frames - k) // s + 1
        return frames
    return length or cfg.data.max_tokens


def default_length(cfg: Config) -> int:
    """The source length the plan counts at (image: its side in pixels)."""
    return {"image": cfg.model.img_size, "audio": cfg.data.max_sample_size,
            "text": cfg.data.max_tokens}[cfg.modality]


def make_batch(shadow: Shadow, samples: int, length: Optional[int] = None) -> ShadowBatch:
    """A micro-batch of `samples` at `length` (see default_length), masks computed for real."""
    cfg, model = shadow.cfg, shadow.model
    length = length or default_length(cfg)
    tokens = tokens_per_sample(cfg, length)
    seeds = sample_seeds(cfg.seed, 0, range(samples), STREAM_MASK)
    masked_source = mask = loss_mask = keep = masked_at = None
    visible = tokens
    if cfg.objective.mode == "v2":
        clones = cfg.objective.clone_batch
        real = model.make_masks(clone_seeds(seeds, clones), None, tokens)
        keep, masked_at = split_indices(real)
        visible = keep.shape[1]
    elif cfg.modality == "text":
        masked_source, real = _text_mask(shadow, samples, tokens, seeds)
    else:
        real = model.make_mask(None, None, None, seeds, tokens)
        mask = real
    if cfg.objective.mode == "v1":
        loss_mask = real

    padding_mask = None
    with shadow.mode():
        dev = shadow.device
        if cfg.modality == "image":
            m = cfg.model
            source = torch.empty(samples, m.in_chans, m.img_size, m.img_size, device=dev)
        elif cfg.modality == "audio":
            source = torch.empty(samples, length, device=dev)
            if cfg.data.pad_audio:
                padding_mask = torch.zeros(samples, length, dtype=torch.bool, device=dev)
        else:
            source = torch.empty(samples, length, dtype=torch.long, device=dev)
            padding_mask = torch.zeros(samples, length, dtype=torch.bool, device=dev)
    fake = shadow.from_real
    return ShadowBatch(source, padding_mask, fake(masked_source), fake(mask), fake(loss_mask),
                       fake(keep), fake(masked_at), samples, tokens, visible)


def random_text(cfg: Config, ids: dict, samples: int, tokens: int) -> torch.Tensor:
    """samples x tokens int64 ids: <s>, ordinary tokens drawn with the run's seed, </s>."""
    gen = torch.Generator().manual_seed(cfg.seed)
    source = torch.randint(len(DEFAULT_SPECIAL_IDS) + 1, max(cfg.model.vocab_size - 1, 6),
                           (samples, tokens), generator=gen)
    source[:, 0], source[:, -1] = ids["bos"], ids["eos"]
    return source


def _text_mask(shadow: Shadow, samples: int, tokens: int, seeds: torch.Tensor):
    """Data2Vec's text masking on random ids: the masked ids and the positions that became
    <mask> (those the loss reads)."""
    cfg, ids = shadow.cfg, shadow.special_ids
    m = cfg.masking
    source = random_text(cfg, ids, samples, tokens)
    special = (source == ids["bos"]) | (source == ids["pad"]) | (source == ids["eos"])
    masked_source, selected = token_mask(
        source, m.mask_prob, special, ids["mask"], cfg.model.vocab_size, seed=seeds,
        span=m.mask_length, replace=tuple(m.replace),
        random_exclude=tuple(ids[k] for k in ("bos", "pad", "eos", "unk", "mask")))
    return masked_source, selected & (masked_source == ids["mask"])


def _no_mark(name: str) -> None:
    pass


def forward(shadow: Shadow, batch: ShadowBatch, mark: Mark = _no_mark):
    """The objective's forward on `batch` (inside shadow.mode()): (loss_sum, student output).

    mark(phase) is called after each part, in order, so a FLOP counter can attribute the work
    since the previous mark: "student" (feature encoder and context encoder), "teacher",
    "head" (v1 regression head) or "decoder" (v2)."""
    if shadow.cfg.objective.mode == "v2":
        return _forward_v2(shadow, batch, mark)
    return _forward_v1(shadow, batch, mark)


def _targets(shadow: Shadow, t_x, t_pad):
    o, n_extra = shadow.cfg.objective, shadow.teacher.num_extra_tokens
    t_out = shadow.teacher.encode(t_x, t_pad, return_layers=True)
    per_block = t_out.layer_results if o.layer_output == "ffn" else t_out.block_results
    layers = [y[:, n_extra:] for y in per_block[-o.top_k:]]
    return ops.teacher_targets(layers, t_pad, layer_norm=o.layer_norm, final_norm=o.final_norm,
                               instance_norm_padding=o.instance_norm_padding)


def _loss(cfg: Config, pred, target):
    o = cfg.objective
    if o.loss_beta == 0:
        per_pos = F.mse_loss(pred, target, reduction="none").sum(-1)
    else:
        per_pos = F.smooth_l1_loss(pred, target, reduction="none", beta=o.loss_beta).sum(-1)
    scale = o.loss_scale if o.loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
    return per_pos.sum() * scale


def _forward_v1(shadow: Shadow, b: ShadowBatch, mark: Mark):
    cfg, model, teacher = shadow.cfg, shadow.model, shadow.teacher
    encoder, n_extra = model.encoder, model.encoder.num_extra_tokens
    if cfg.modality == "text":
        x, x_pad = encoder.embed(b.masked_source, b.padding_mask)
        student = encoder.encode(x, x_pad)
        mark("student")
        with torch.no_grad():
            t_x, t_pad = teacher.embed(b.source, b.padding_mask)
    else:
        x, x_pad = encoder.embed(b.source, b.padding_mask)
        student = encoder.encode(x, x_pad, mask=b.mask)
        mark("student")
        with torch.no_grad():
            if teacher_reads_student_features(cfg.objective.ema_scope):
                t_x, t_pad = x.detach(), x_pad
            else:
                t_x, t_pad = teacher.embed(b.source, b.padding_mask)
    with torch.no_grad():
        targets = _targets(shadow, t_x, t_pad)
    mark("teacher")
    hidden = student.x[:, n_extra:]
    at = b.loss_mask[..., None]  # as Data2Vec.forward: the head on every position
    pred = torch.where(at, model.head(hidden).float(), 0.0)
    loss = _loss(cfg, pred, torch.where(at, targets, 0.0))
    mark("head")
    return loss, student.x


def _forward_v2(shadow: Shadow, b: ShadowBatch, mark: Mark):
    cfg, model, teacher = shadow.cfg, shadow.model, shadow.teacher
    o, encoder = cfg.objective, model.encoder
    n_extra, clones = encoder.num_extra_tokens, o.clone_batch
    x, x_pad = encoder.embed(b.source, b.padding_mask)
    mark("student")
    with torch.no_grad():
        if teacher_reads_student_features(o.ema_scope):
            t_x, t_pad = x.detach(), x_pad
        else:
            t_x, t_pad = teacher.embed(b.source, b.padding_mask)
        targets = _targets(shadow, t_x, t_pad)
    mark("teacher")
    x = x.repeat_interleave(clones, 0)
    pad = None if x_pad is None else x_pad.repeat_interleave(clones, 0)
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, b.keep, False)
    student = encode_visible(encoder, x, pad, mask, b.keep)
    mark("student")
    dec = model.decoder(model.decoder_input(student.x[:, n_extra:], b.keep, x.shape[1], pad))
    pred = gather_tokens(dec, b.masked_at).flatten(0, 1).float()
    sample = torch.arange(mask.shape[0], device=x.device) // clones
    target = targets[sample[:, None], b.masked_at].flatten(0, 1)
    loss = _loss(cfg, pred, target)
    if o.cls_loss > 0:
        cls_target = targets.mean(dim=1).repeat_interleave(clones, 0)
        cls = _loss(cfg, student.x[:, n_extra - 1].float(), cls_target)
        loss = loss + cls * (o.cls_loss * float(b.masked_at.numel()))
    mark("decoder")
    return loss, student.x
