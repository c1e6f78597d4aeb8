"""Peak memory per rank of one training step, estimated before any GPU is touched, and the largest
micro-batch that fits a budget (train.micro_batch=auto).

The step runs on fake tensors (d2v_engine.planning.shadow: the run's modules, full depth, at the run's shapes)
with the run's precision (bf16 autocast, on the CPU's autocast: matmuls and convolutions in bf16
as on CUDA), activation checkpointing, optimizer (its state is made by one step beforehand) and
gradient accumulation (with more than one micro-batch, the gradients of the earlier ones are alive
while the last one runs). PeakTracker, a TorchDispatchMode as torch's MemTracker
(torch.distributed._tools.mem_tracker) but counting only what the plan prints, follows every
tensor storage the step creates until it is freed, rounded up as CUDA's caching allocator rounds
(512 bytes). MemTracker itself gives the same peak but costs ~10x the time (it snapshots every
module at every op), too slow to search micro-batches with.

Sharding: DDP keeps its gradients in its buckets (gradient_as_bucket_view), so a DDP rank needs
what one process does. FSDP2 (train.distributed=fsdp) is estimated from that: parameters,
gradients, optimizer state and teacher divided by the world size, plus two unsharded blocks of
parameters and gradients (the one computing and the one prefetched) for the student and two of
parameters for the teacher. Not counted: the CUDA context and library workspaces (about 0.5-1 GB,
outside torch.cuda.max_memory_allocated too), the allocator's fragmentation; train.memory_fraction
(default 0.9) leaves room for them.

DALI decoding on the GPU (the loader DALI, on CUDA) holds device memory outside torch's allocator
and never gives it back: `dali_bytes_per_sample` estimates it (not measured on a GPU yet), per
sample of the micro-batch and for DALI_IN_FLIGHT batches (its prefetch queue and the batch being
copied to torch). Images: the decoded photo (uint8, at the mean size of the data's first files,
read from their headers, or at DALI_SOURCE_PIXELS, an ImageNet photo's typical 500 x 375, without
the data: the decode precedes the crop), two fp32 copies of it when colour jitter runs
(on the whole image, before the crop), and the resized and the normalized crop in fp32. Audio: the
decoded file, its normalized copy and the crop in fp32, at the manifest's longest file. The plan
adds it to the peak, so micro_batch=auto leaves room for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from d2v_engine.config import Config
from d2v_engine.data.audio import crop_group_size
from d2v_engine.data.dali_images import image_size
from d2v_engine.data.select import choose_loader
from d2v_engine.errors import ConfigError
from d2v_engine.objective.optim import build_optimizer
from d2v_engine.planning.shadow import Shadow, build_shadow, forward, make_batch

GB = 1e9  # the plan's unit: decimal gigabytes (train.device_memory_gb)
DALI_IN_FLIGHT = 3  # the loader's prefetch_queue_depth (2) + the batch copied to torch
DALI_SOURCE_PIXELS = 500 * 375
_CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block


def fmt_bytes(nbytes: float) -> str:
    """1.23 GB, or 45.6 MB below 0.1 GB."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def _rounded(nbytes: int) -> int:
    return math.ceil(nbytes / _CUDA_BLOCK) * _CUDA_BLOCK


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += _rounded(st.nbytes())
    return total


class PeakTracker(TorchDispatchMode):
    """Bytes of the storages created inside it that are still alive, and their peak; the part of
    the peak that was gradients of `params`. Tensors in `existing` (parameters, optimizer state:
    counted by the caller) are known: a view of one (a transposed weight) allocates nothing."""

    def __init__(self, params=(), existing=(), block: int = _CUDA_BLOCK):
        super().__init__()
        self.block = block  # sizes round up to a multiple of this (1: exact bytes)
        self.live = self.peak = self.grads = self.grads_at_peak = 0
        self._alive: dict[int, list] = {}  # id(storage) -> [bytes, is_grad, weakref]
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad) for p in params]
        for t in existing:
            self.add(t, counted=False)

    def add(self, t: torch.Tensor, counted: bool = True) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._alive:
            return
        nbytes = -(-st.nbytes() // self.block) * self.block if counted else 0
        self._alive[key] = [nbytes, False, weakref.ref(st, lambda _, k=key: self._free(k))]
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.grads_at_peak = self.live, self.grads

    def _free(self, key: int) -> None:
        nbytes, is_grad, _ = self._alive.pop(key)
        self.live -= nbytes
        if is_grad:
            self.grads -= nbytes

    def _grad(self, param: torch.Tensor) -> None:
        entry = self._alive.get(id(param.grad.untyped_storage()))
        if entry is not None and not entry[1]:
            entry[1] = True
            self.grads += entry[0]

    def __exit__(self, *args):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def plan_precision(cfg: Config, device_type: str) -> str:
    """What the run computes in on `device_type`: bf16 (autocast) or fp32 (train.precision)."""
    p = cfg.train.precision
    return "bf16" if p == "bf16" or (p == "auto" and device_type == "cuda") else "fp32"


@dataclass
class MemoryModel:
    """A fake copy of the run's model, optimizer included, to measure steps of any micro-batch."""
    shadow: Shadow
    optimizer: torch.optim.Optimizer
    precision: str  # bf16 | fp32
    world_size: int
    fsdp: bool
    loader_per_sample: int = 0  # DALI's device memory per sample (dali_bytes_per_sample)

    @staticmethod
    def build(cfg: Config, device_type: str, world_size: int,
              special_ids: Optional[dict] = None, extent: int = 0) -> "MemoryModel":
        shadow = build_shadow(cfg, special_ids, fake=True)
        impl = cfg.optim.impl
        if impl in ("auto", "apex"):  # apex's FusedAdam keeps the same state, no temporaries
            impl = "fused" if device_type == "cuda" else "foreach"
        optim_cfg = dataclasses.replace(cfg.optim, impl=impl)
        with shadow.mode():
            optimizer = build_optimizer(shadow.model, optim_cfg, cfg.optim.lr, torch.device("cpu"))
            params = [p for p in shadow.model.parameters() if p.requires_grad]
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # makes the state (exp_avg, exp_avg_sq, step)
            optimizer.zero_grad(set_to_none=True)
        fsdp = cfg.train.distributed == "fsdp" and world_size > 1
        loader = (dali_bytes_per_sample(cfg, extent)
                  if device_type == "cuda" and choose_loader(cfg.data, cfg.modality) == "dali"
                  else 0)
        return MemoryModel(shadow, optimizer, plan_precision(cfg, device_type), world_size, fsdp,
                           loader)

    def measure(self, micro_batch: int, accumulation: int) -> dict:
        """Peak bytes per rank of a step at this micro-batch, with its parts at the peak:
        params (the student's, buffers included), grads, optimizer (state), teacher, and
        activations (everything else alive then: the micro-batch, saved activations,
        temporaries)."""
        sh, cfg = self.shadow, self.shadow.cfg
        model, teacher = sh.model, sh.teacher
        params = [p for p in model.parameters() if p.requires_grad]
        batch = make_batch(sh, micro_batch)
        with sh.mode():
            if accumulation > 1:  # the earlier micro-batches' gradients
                for p in params:
                    p.grad = torch.zeros_like(p)
            state = [t for s in self.optimizer.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor)]
            grads = [p.grad for p in params if p.grad is not None]
            parts = {"params": list(model.parameters()) + list(model.buffers()),
                     "teacher": list(teacher.parameters()) + list(teacher.buffers()),
                     "optimizer": state, "grads": grads}
            static = {k: _bytes(v) for k, v in parts.items()}
            tracker = PeakTracker(params, [t for v in parts.values() for t in v])
            with tracker:
                for t in (batch.source, batch.padding_mask, batch.mask, batch.loss_mask,
                          batch.keep, batch.masked_at, batch.masked_source):
                    if t is not None:
                        tracker.add(t)  # the micro-batch on the device
                with self._autocast():
                    loss, out = forward(sh, batch)
                loss.backward()
                del loss, out
                max_norm = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                self.optimizer.step()
            model.zero_grad(set_to_none=True)
        grads = static["grads"] + tracker.grads_at_peak
        out = {
            "micro_batch": micro_batch,
            "params": static["params"],
            "grads": grads,
            "optimizer": static["optimizer"],
            "teacher": static["teacher"],
            "activations": tracker.peak - tracker.grads_at_peak,
            "loader": self.loader_per_sample * micro_batch * DALI_IN_FLIGHT,
        }
        if self.fsdp:
            self._shard(out)
        out["peak"] = sum(out[k] for k in PARTS)
        return out

    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def _shard(self, m: dict) -> None:
        """FSDP2: states divided by the world size; unsharded blocks at work added."""
        w = self.world_size
        student_block = _bytes(self.shadow.model.encoder.blocks.blocks[0].parameters())
        teacher_block = _bytes(self.shadow.teacher.blocks.blocks[0].parameters())
        m["params"] = m["params"] // w + 2 * student_block
        m["grads"] = m["grads"] // w + 2 * student_block
        m["optimizer"] = m["optimizer"] // w
        m["teacher"] = m["teacher"] // w + 2 * teacher_block


PARTS = ("params", "grads", "optimizer", "teacher", "activations", "loader")


def dali_bytes_per_sample(cfg: Config, extent: int = 0) -> int:
    """DALI's device memory per sample of a micro-batch, one batch of it (an estimate: the module
    docstring says what is counted). extent: the source images' pixels, or the longest audio
    file's samples; 0: unknown."""
    d = cfg.data
    if cfg.modality == "image":
        pixels = extent or DALI_SOURCE_PIXELS
        jitter = 2 * 12 * pixels if d.augment and any(d.color_jitter) else 0
        return 3 * pixels + jitter + 2 * 12 * d.img_size ** 2
    if cfg.modality == "audio":
        return 4 * (2 * max(extent, d.max_sample_size) + d.max_sample_size)
    return 0


def source_extent(dataset, files: int = 16) -> int:
    """The dataset's source size for dali_bytes_per_sample: the mean pixels of its first images
    (headers only), or its longest audio file's samples; 0 without the data."""
    if dataset is None:
        return 0
    sizes = getattr(dataset, "sizes", None)
    if sizes is not None:
        return int(sizes.max()) if len(sizes) else 0
    pixels = []
    for path in list(getattr(dataset, "files", []))[:files]:
        try:
            with open(path, "rb") as f:
                width, height = image_size(f.read(1 << 16))
        except (OSError, ValueError):
            continue
        pixels.append(width * height)
    return int(sum(pixels) / len(pixels)) if pixels else 0


def candidates(share: int, group: int = 0) -> list[int]:
    """Micro-batches allowed for a per-rank share of the global batch: its divisors that are
    multiples of 8, or any divisor below 8; with audio crop groups of `group` clips, only those
    that also divide the group (a micro-batch holds part of one group: d2v_engine.planning.plan)."""
    return [d for d in range(1, share + 1) if share % d == 0 and (d < 8 or d % 8 == 0)
            and (not group or group % d == 0)]


def largest_fitting(mm: MemoryModel, share: int, limit: float, below: Optional[int] = None,
                    group: int = 0) -> tuple[Optional[dict], list[dict]]:
    """Search over candidates(share, group) (those under `below` only): (the largest one's estimate
    that fits under `limit` bytes or None, every estimate made). Peak memory grows with the
    micro-batch, so the fitting ones are a prefix; each measurement narrows [lo, hi] as a binary
    search does, and the next probe is the one its activations per sample predict to be the
    answer (usually 3 measurements instead of log2 of the candidates)."""
    options = [c for c in candidates(share, group) if below is None or c < below]
    tried = []
    lo, hi, best, probe = 0, len(options) - 1, None, (len(options) - 1) // 2
    while lo <= hi:
        m = mm.measure(options[probe], share // options[probe])
        tried.append(m)
        if m["peak"] <= limit:
            best, lo = m, probe + 1
        else:
            hi = probe - 1
        per_sample = (m["activations"] + m["loader"]) / m["micro_batch"]
        fixed = m["peak"] - m["activations"] - m["loader"]
        fits = [i for i in range(lo, hi + 1) if fixed + per_sample * options[i] <= limit]
        probe = max(fits) if fits else lo
    return best, tried


def describe_memory(m: dict, budget: Optional[dict]) -> list[str]:
    """The plan's memory lines."""
    f = {k: fmt_bytes(m[k]) for k in (*PARTS, "peak")}
    lines = [f"  memory per rank at micro-batch {m['micro_batch']} ({m['precision']}, "
             f"{m['sharding']}{', activation checkpointing' if m['checkpointing'] else ''}): "
             f"peak {f['peak']} = params {f['params']} + grads {f['grads']} + optimizer "
             f"{f['optimizer']} + teacher {f['teacher']} + activations {f['activations']}"
             + (f" + DALI on the GPU {f['loader']} (estimate)" if m["loader"] else "")]
    if budget:
        lines.append(f"  budget {_budget(budget)} ({budget['source']})")
    if m.get("auto"):
        lines.append(f"  train.micro_batch=auto: {m['auto']}")
    return lines


def _budget(budget: dict) -> str:
    return (f"train.memory_fraction {budget['fraction']} x {fmt_bytes(budget['device_gb'] * GB)}"
            f" = {fmt_bytes(budget['limit_gb'] * GB)}")


def plan_memory(cfg: Config, share: int, world_size: int, device_type: str,
                budget: Optional[dict], special_ids: Optional[dict] = None,
                extent: int = 0) -> dict:
    """plan.json's "memory": the estimate at train.micro_batch (or the one auto chose), checked
    against the budget. ConfigError when it does not fit, naming what does."""
    t = cfg.train
    mm = MemoryModel.build(cfg, device_type, world_size, special_ids, extent)
    group = crop_group_size(cfg.data, t.global_batch) if cfg.modality == "audio" else 0
    limit = budget["limit_gb"] * GB if budget else None
    if t.micro_batch == "auto":
        if budget is None:
            raise ConfigError("config key 'train.micro_batch': auto needs a memory budget: no GPU "
                              "is visible, so set train.device_memory_gb")
        best, tried = largest_fitting(mm, share, limit, group=group)
        if best is None:
            raise ConfigError(_nothing_fits(cfg, tried[-1] if tried else mm.measure(1, share),
                                            budget))
        larger = [m for m in tried if m["micro_batch"] > best["micro_batch"]]
        why = (f"chose {best['micro_batch']} of {candidates(share, group)} (the divisors of the "
               f"per-rank share {share} that are multiples of 8, or below 8"
               + (f", and divide data.crop_group's {group}"
                  if candidates(share, group) != candidates(share) else "")
               + f"): "
               f"{fmt_bytes(best['peak'])} fits {fmt_bytes(limit)}")
        if larger:
            nxt = min(larger, key=lambda m: m["micro_batch"])
            why += f", {nxt['micro_batch']} needs {fmt_bytes(nxt['peak'])}"
        elif best["micro_batch"] == share:
            why += " (the whole share: no accumulation)"
        result = dict(best, auto=why)
    else:
        micro = t.micro_batch or share
        result = mm.measure(micro, share // micro)
        if limit is not None and result["peak"] > limit:
            best, _ = largest_fitting(mm, share, limit, below=micro, group=group)
            raise ConfigError(_too_big(result, best, budget) if best else
                              _nothing_fits(cfg, result, budget))
    result.update(precision=mm.precision, sharding=_sharding(cfg, world_size),
                  checkpointing=cfg.model.activation_checkpointing)
    return result


def _sharding(cfg: Config, world_size: int) -> str:
    if world_size <= 1:
        return "1 rank"
    if cfg.train.distributed == "fsdp":
        return f"FSDP over {world_size} ranks"
    return f"DDP over {world_size} ranks"


def _parts(m: dict) -> str:
    return ", ".join(f"{k} {fmt_bytes(m[k])}" for k in PARTS if k != "loader" or m[k])


def _too_big(m: dict, best: dict, budget: dict) -> str:
    return (f"config key 'train.micro_batch': {m['micro_batch']} needs an estimated "
            f"{fmt_bytes(m['peak'])} per rank ({_parts(m)}), more than {_budget(budget)}; "
            f"micro-batch {best['micro_batch']} fits ({fmt_bytes(best['peak'])}): set "
            f"train.micro_batch={best['micro_batch']} or auto")


def _nothing_fits(cfg: Config, m: dict, budget: dict) -> str:
    hints = ["model.activation_checkpointing=true"] if not cfg.model.activation_checkpointing \
        else []
    if cfg.train.distributed != "fsdp":
        hints.append("train.distributed=fsdp on several ranks")
    return (f"config key 'train.micro_batch': even micro-batch {m['micro_batch']} needs an "
            f"estimated {fmt_bytes(m['peak'])} per rank ({_parts(m)}), more than "
            f"{_budget(budget)}; try {' or '.join(hints + ['a larger device'])}")
