"""FLOPs of a training step, counted by torch.utils.flop_counter.FlopCounterMode on fake tensors
(d2v_engine.planning.shadow: the run's modules at the run's shapes, no memory, no GPU), and MFU.

One sample's step is split into:
  teacher  its forward (no backward), feature encoder included when it has its own (v1 text, or
           objective.ema_scope=all);
  student  forward + backward of the feature encoder and the context encoder;
  head     v1: the regression head, forward + backward, on the masked positions;
  decoder  v2: the conv decoder (projection included), forward + backward, on every clone.
The backward is split where the gradient reaches the student's output (a hook on it): before it,
the head / decoder backward; after it, the student's. Matmuls and convolutions count 2 FLOPs per
multiply-add, as FlopCounterMode does; attention counts as in FlashAttention (4 B H Tq Tk D
forward, 2.5x that backward: d2v_kernels.ops); element-wise work, norms and softmax are not counted.

Audio and text batches vary in length (audio batches are cropped to their shortest sample), so
the per-sample count is fitted as a*T + b*T^2 in the sample's tokens T from counts at the plan's
length and at half of it; StepFlops gives a batch's FLOPs from its shape. MFU = achieved FLOP/s
over the device's dense bf16 peak (PEAK_TFLOPS, or train.peak_tflops).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import d2v_kernels.ops  # noqa: F401  (registers the attention op pair's FLOP formulas)
from d2v_engine.config import Config
from d2v_engine.planning.shadow import (
    Shadow, build_shadow, default_length, forward, make_batch, tokens_per_sample,
)

PHASES = ("teacher", "student", "head", "decoder")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name() in this order (first substring found wins).
PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM (HBM3)
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a CUDA device name, or None when it is not listed."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_peak(cfg: Config, device: torch.device) -> tuple[str, Optional[float]]:
    """(what the peak is, TFLOP/s or None): train.peak_tflops, the table, or unknown (CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if cfg.train.peak_tflops is not None:
        return f"train.peak_tflops for {name}", cfg.train.peak_tflops
    if device.type != "cuda":
        return f"{name}: no known peak", None
    tflops = peak_tflops(name)
    return (f"{name} dense bf16" if tflops else f"{name}: not in d2v_engine.planning.flops.PEAK_TFLOPS "
            f"(set train.peak_tflops)"), tflops


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                         transposed, _output_padding, _groups, output_mask, out_shape=None,
                         **kwargs) -> int:
    """Each gradient of a convolution (input, weight) costs one forward. torch's own formula
    counts the weight gradient of a grouped convolution as if it had one group (groups times too
    many: a 16-group decoder conv's backward came out at 17x its forward)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


COUNTER_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flops}


def count_sample(shadow: Shadow, length: Optional[int] = None) -> dict:
    """FLOPs of one sample's training step at `length` (d2v_engine.planning.shadow.default_length), per
    phase, and the tokens the teacher and the student encode (extra tokens included)."""
    batch = make_batch(shadow, 1, length)
    counts = dict.fromkeys(PHASES, 0)
    with shadow.mode(), FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS) as counter:
        last = [0]

        def mark(phase: str) -> None:
            total = counter.get_total_flops()
            counts[phase] += total - last[0]
            last[0] = total

        loss, student_out = forward(shadow, batch, mark)
        # The gradient reaches the student's output once the head / decoder backward is done.
        student_out.register_hook(lambda grad: mark(_other_phase_of(shadow.cfg.objective.mode)))
        loss.backward()
        mark("student")
    shadow.model.zero_grad(set_to_none=True)
    extra = shadow.model.encoder.num_extra_tokens
    clones = shadow.cfg.objective.clone_batch if shadow.cfg.objective.mode == "v2" else 1
    counts["tokens_teacher"] = batch.tokens + extra
    counts["tokens_student"] = clones * (batch.visible + extra)
    return counts


def _other_phase_of(mode: str) -> str:
    """What follows the student's encoder: v1's regression head, v2's decoder."""
    return "decoder" if mode == "v2" else "head"


@dataclass
class FlopModel:
    """Per-sample FLOPs per phase as a * T + b * T^2 in the sample's tokens T (images: T fixed)."""
    modality: str
    linear: dict  # phase -> a
    quadratic: dict  # phase -> b
    tokens: int  # T at the plan's length
    extra_tokens: int
    conv_layers: list  # audio: samples -> frames

    def sample_flops(self, tokens: Optional[int] = None) -> dict:
        t = self.tokens if tokens is None else tokens
        return {p: self.linear[p] * t + self.quadratic[p] * t * t for p in self.linear}

    def batch_tokens(self, source_shape) -> tuple[int, int]:
        """(samples, tokens per sample) of a batch whose source has this shape."""
        samples = int(source_shape[0])
        if self.modality == "image":
            return samples, self.tokens
        length = int(source_shape[1])
        if self.modality == "audio":
            for _, k, s in self.conv_layers:
                length = (length - k) // s + 1
        return samples, max(length, 0)

    def batch_flops(self, source_shape) -> tuple[float, int]:
        """(FLOPs, tokens through the teacher) of one micro-batch's training step."""
        samples, tokens = self.batch_tokens(source_shape)
        return (samples * sum(self.sample_flops(tokens).values()),
                samples * (tokens + self.extra_tokens))


def count_at_depth(cfg: Config, special_ids: Optional[dict] = None,
                   length: Optional[int] = None, shadows: Optional[list] = None) -> dict:
    """count_sample of the run's model. Counted on the meta device at depths 1 and 2 and
    extrapolated: the blocks are identical in shape, so each block after the first adds the same
    FLOPs (drop path, the one per-block difference, is 0 in the first block at any depth and
    counts no FLOPs anyway). Exact, and the cost does not grow with model.depth."""
    depth = cfg.model.depth
    if shadows is None:
        shadows = [build_shadow(cfg, special_ids, fake=False, depth=d)
                   for d in ((1, 2) if depth > 2 else (depth,))]
    counts = [count_sample(s, length) for s in shadows]
    if len(counts) == 1:
        return counts[0]
    one, two = counts
    out = dict(one)
    out.update({p: one[p] + (depth - 1) * (two[p] - one[p]) for p in PHASES})
    return out


_counted: dict = {}  # one count per model and shapes in a process (tests train many runs)


def count_flops(cfg: Config, special_ids: Optional[dict] = None) -> tuple[dict, FlopModel]:
    """Counts one sample's step at the plan's length (and at half of it for audio / text, to fit
    the length model); returns (plan.json's "flops" per sample, the FlopModel)."""
    key = json.dumps([cfg.modality, cfg.seed, asdict(cfg.model), asdict(cfg.objective),
                      asdict(cfg.masking), asdict(cfg.data), special_ids], sort_keys=True,
                     default=str)
    if key not in _counted:
        _counted[key] = _count_flops(cfg, special_ids)
    info, model = _counted[key]
    return copy.deepcopy(info), model


def _count_flops(cfg: Config, special_ids: Optional[dict]) -> tuple[dict, FlopModel]:
    depth = cfg.model.depth
    shadows = [build_shadow(cfg, special_ids, fake=False, depth=d)
               for d in ((1, 2) if depth > 2 else (depth,))]
    full = count_at_depth(cfg, length=None, shadows=shadows)
    t1 = tokens_per_sample(cfg)
    linear = {p: full[p] / t1 for p in PHASES}
    quadratic = dict.fromkeys(PHASES, 0.0)
    if cfg.modality != "image":
        half_length = max(1, default_length(cfg) // 2)
        half = count_at_depth(cfg, length=half_length, shadows=shadows)
        t2 = tokens_per_sample(cfg, half_length)
        if 0 < t2 < t1:
            # f(t) = a t + b t^2 through both counts
            for p in PHASES:
                b = (full[p] / t1 - half[p] / t2) / (t1 - t2)
                quadratic[p] = b
                linear[p] = full[p] / t1 - b * t1
    extra = shadows[0].model.encoder.num_extra_tokens
    model = FlopModel(cfg.modality, linear, quadratic, t1, extra,
                      [list(c) for c in cfg.model.conv_layers])
    per_sample = {p: int(full[p]) for p in PHASES}
    per_sample["total"] = sum(per_sample.values())
    info = {"per_sample": per_sample,
            "tokens_per_sample": {"teacher": full["tokens_teacher"],
                                  "student": full["tokens_student"]},
            "length": default_length(cfg)}
    return info, model


def step_info(per_sample_info: dict, global_batch: int, world_size: int) -> dict:
    """plan.json's "flops": per sample, per step (all ranks) and per rank and step."""
    out = dict(per_sample_info)
    out["per_step"] = {k: v * global_batch for k, v in per_sample_info["per_sample"].items()}
    out["per_rank_step"] = out["per_step"]["total"] / world_size
    out["tokens_per_step"] = {k: v * global_batch
                              for k, v in per_sample_info["tokens_per_sample"].items()}
    return out


def fmt_flops(flops: float) -> str:
    """FLOPs with a unit: 141.2 GFLOP, 2.03 PFLOP."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.{2 if unit == 'PFLOP' else 1}f} {unit}"
    return f"{flops:.0f} FLOP"


def describe_flops(info: dict, modality: str, mode: str) -> list[str]:
    """The plan's FLOP lines."""
    s, st = info["per_sample"], info["per_step"]
    unit = {"image": "image", "audio": "crop", "text": "sequence"}[modality]
    other = _other_phase_of(mode)
    at = {"image": "", "audio": f" at {info['length']} samples (the longest crop; shorter "
          f"batches cost less)", "text": f" at {info['length']} tokens"}[modality]
    tok = info["tokens_per_sample"]
    g = {k: fmt_flops(v) for k, v in s.items()}
    return [
        f"  FLOPs per {unit}{at}: {g['total']} = teacher fwd {g['teacher']} + "
        f"student fwd+bwd {g['student']} + {other} fwd+bwd {g[other]}",
        f"  FLOPs per step: {fmt_flops(st['total'])} ({fmt_flops(info['per_rank_step'])} per "
        f"rank); tokens encoded per {unit}: teacher {tok['teacher']}, student {tok['student']}",
    ]
