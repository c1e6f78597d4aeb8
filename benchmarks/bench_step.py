"""Training-step throughput: samples/s, tokens/s and MFU of the full data2vec step, with a breakdown.

    python -m benchmarks.bench_step [--tiny] [--quick] [--modalities image,image_v2,audio,text]
                                    [--steps N] [--json PATH]
    python -m pytest benchmarks/bench_step.py        (pytest-benchmark; never collected by default)

Per base config (image v1 and v2, audio, text; --tiny: the tiny configs, small batches, for the
CPU) three steps built from the same models, the same synthetic batch and the same seeds run side
by side:

  ours          d2v_engine.runtime.compile'd student and teacher encoders, our public ops (Triton attention,
                targets and masking on CUDA), d2v_engine.objective.optim's AdamW
  plain         eager, the plain-math attention_reference, the *_reference ops: a straightforward
                PyTorch data2vec step
  sdpa_compile  plain, but with scaled_dot_product_attention and torch.compile'd encoders

The peers run at their best outside the ops under test: all three scale the gradients, clip and
update the EMA teacher with torch's multi-tensor (foreach) ops, and the peers' AdamW is torch's
fused one on CUDA (foreach on the CPU), over the same parameter groups as ours.

--quick (make gpu-check): image v1, image v2 and audio v1 only, 6 timed steps (2 for the
breakdown), no encoder-alone comparison, regional compilation for both compiled variants (each
block compiled on its own, d2v_engine.runtime.compile: one block graph per mode, train and eval, that every
block of the student and the teacher reuses, instead of whole-encoder graphs: a fraction of the
compile time, the same kernels inside each block), and the configs' own dropout (the full runs
switch dropout off).

The step is what the trainer runs for one micro-batch that is also the whole batch: host-to-device
copy of a pinned, collated batch (the "loader" phase; decoding is bench_loader's), forward of
student and teacher with masks and targets, backward, grad scaling, clipping, optimizer, EMA.
Throughput is timed over --steps steps with one synchronization at the end; the breakdown is a
second pass that runs the same work phase by phase (loader, masking, teacher, targets, student fwd
+bwd, optimizer, EMA) with CUDA events between phases (time.perf_counter + synchronize on CPU).

FLOPs (model FLOPs, counted analytically from the config; MFU = FLOPs x steps/s / measured peak):
  per encoder forward over B samples of T tokens (CLS included), L blocks, width C, FFN width F:
      blocks      B * L * (2 * T * (4 C^2 + 2 C F)   [q, k, v, out, fc1, fc2]
                           + 4 * T^2 * C)             [q k^T and p v: 4 T^2 D H, D H = C]
      features    image: 2 * B * P * (3 p^2) * C (patch conv);  audio: 2 * B * sum over convs of
                  T_out * C_in * k * C_out + feature projection 2 B T C_conv C + positional convs
                  2 B T C (C / groups) k per conv;  text: none (embedding lookups)
      head        2 * M * (regression-head MACs per position), M = masked positions
  step = 3 * (student features + blocks + head)  [forward + backward = 2 x forward]
       + teacher blocks (+ features when objective.ema_scope = all)      [forward only]
The peak is a bf16 8192^3 torch.matmul measured in the same run (fp32 512^3 on the CPU, where the
step runs in fp32; CPU numbers check the suite, they are not a performance claim).

data2vec 2.0 (image_v2) has no FLOP model here: its rows give samples/s without MFU, and no
phase breakdown (the phases above are the v1 objective's).

Also the encoder alone (image; forward + backward of its output's sum) against Hugging Face
transformers' Data2VecVisionModel and timm's ViT-B/16 (same width, depth, heads, patch size),
each where installed. Records: benchmarks.common.record; `cases(tiny)` gives run_all one guarded
case per modality, each emitting its rows as they are measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import pytest
import torch

import d2v_engine.objective.data2vec as d2v_module
import d2v_engine.objective.data2vec_v2 as d2v2_module
import d2v_engine.models.transformer as transformer_module
from benchmarks import common
from d2v_engine.runtime.compile import compile_encoder
from d2v_engine.config import Config, load_config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher, teacher_shared_prefixes
from d2v_engine.objective.step import teacher_may_skip_padding
from d2v_engine.run.mask_ahead import host_to_device
from d2v_engine.models import build_model
from d2v_engine.objective.optim import build_optimizer, param_groups
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_kernels import attention as attention_ops
from d2v_kernels import ops as kernel_ops
from d2v_kernels import masking as masking_ops
from d2v_kernels import targets as targets_ops

VARIANTS = ("ours", "plain", "sdpa_compile")
PHASES = ("loader", "masking", "teacher", "targets", "student", "optimizer", "ema")
MODALITIES = ("image", "image_v2", "audio", "text")
QUICK = ("image", "image_v2", "audio")


@dataclass(frozen=True)
class Case:
    modality: str
    config: str
    batch: int
    length: int  # image: unused (img_size); audio: samples; text: tokens


CASES = {
    "image": Case("image", "configs/image_base.yaml", 256, 0),
    "image_v2": Case("image", "configs/image_v2.yaml", 16, 0),  # x 16 clones
    "audio": Case("audio", "configs/audio_base.yaml", 16, 320000),
    "text": Case("text", "configs/text_base.yaml", 64, 512),
}
TINY = {
    "image": Case("image", "configs/tiny_image.yaml", 8, 0),
    "image_v2": Case("image", "configs/tiny_image_v2.yaml", 4, 0),
    "audio": Case("audio", "configs/tiny_audio.yaml", 4, 16000),
    "text": Case("text", "configs/tiny_text.yaml", 8, 64),
}


def special_ids(vocab: int) -> dict:
    return {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": vocab - 1}


def load_case(case: Case, keep_dropout: bool = False) -> Config:
    """The case's config; dropout off unless keep_dropout (--quick keeps the configs' dropout: the
    attention kernels it compiles are then the ones make gpu-check's tests compiled before)."""
    cfg = load_config(common.ROOT / case.config)
    if not keep_dropout:
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
    return cfg


def make_batch(cfg: Config, case: Case, seed: int = 0) -> dict:
    """A collated CPU batch (pinned on CUDA machines) shaped like the loader's."""
    g = torch.Generator().manual_seed(seed)
    if case.modality == "image":
        s = cfg.model.img_size
        batch = {"source": torch.randn(case.batch, cfg.model.in_chans, s, s, generator=g)}
    elif case.modality == "audio":
        batch = {"source": torch.randn(case.batch, case.length, generator=g)}
    else:
        ids = special_ids(cfg.model.vocab_size)
        source = torch.randint(4, cfg.model.vocab_size - 1, (case.batch, case.length), generator=g)
        source[:, 0], source[:, -1] = ids["bos"], ids["eos"]
        batch = {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)}
    if torch.cuda.is_available():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def tokens_per_sample(cfg: Config, case: Case) -> int:
    """Context-encoder tokens per sample (CLS included for images)."""
    if case.modality == "image":
        return (cfg.model.img_size // cfg.model.patch_size) ** 2 + 1
    if case.modality == "audio":
        n = case.length
        for _, k, s in cfg.model.conv_layers:
            n = (n - k) // s + 1
        return n
    return case.length


def step_flops(cfg: Config, case: Case) -> float:
    """Model FLOPs of one data2vec v1 step (formula in the module docstring)."""
    m, B = cfg.model, case.batch
    T, C, F, L = tokens_per_sample(cfg, case), m.embed_dim, m.ffn_dim, m.depth
    blocks = B * L * (2 * T * (4 * C * C + 2 * C * F) + 4 * T * T * C)
    if case.modality == "image":
        patches = T - 1
        features = 2 * B * patches * m.in_chans * m.patch_size ** 2 * C
    elif case.modality == "audio":
        features, n, c_in = 0, case.length, 1
        for c_out, k, s in m.conv_layers:
            n = (n - k) // s + 1
            features += 2 * B * n * c_in * k * c_out
            c_in = c_out
        kernel = max(3, m.conv_pos // m.conv_pos_depth)
        features += 2 * B * T * c_in * C + m.conv_pos_depth * 2 * B * T * C * (C // m.conv_pos_groups) * kernel
    else:
        features = 0
    masked = B * (T - (1 if case.modality == "image" else 0)) * cfg.masking.mask_prob
    head_macs = C * C if m.head_layers <= 1 else C * 2 * C + (m.head_layers - 2) * 4 * C * C + 2 * C * C
    head = 2 * masked * head_macs
    teacher = blocks + (features if cfg.objective.ema_scope == "all" else 0)
    return 3 * (features + blocks + head) + teacher


def encoder_forward_flops(cfg: Config, batch: int) -> float:
    m = cfg.model
    T = (m.img_size // m.patch_size) ** 2 + 1
    C, F = m.embed_dim, m.ffn_dim
    blocks = batch * m.depth * (2 * T * (4 * C * C + 2 * C * F) + 4 * T * T * C)
    return blocks + 2 * batch * (T - 1) * m.in_chans * m.patch_size ** 2 * C


# ---------------------------------------------------------------------------------------------
# The three steps


@contextlib.contextmanager
def reference_ops(attention: str):
    """Swaps the ops the models and the objective call: attention "reference" (plain math) or
    "sdpa", and the reference masks and targets; restores them afterwards."""
    saved = {(transformer_module, "attention"): transformer_module.attention}
    swaps = {(d2v_module, "span_mask"): masking_ops.span_mask_reference,
             (d2v_module, "block_mask"): masking_ops.block_mask_reference,
             (d2v_module, "token_mask"): masking_ops.token_mask_reference,
             (d2v_module, "teacher_targets"): targets_ops.teacher_targets_reference,
             (d2v2_module, "span_mask"): masking_ops.span_mask_reference,
             (d2v2_module, "block_mask"): masking_ops.block_mask_reference,
             (d2v2_module, "teacher_targets"): targets_ops.teacher_targets_reference}
    for (module, name) in swaps:
        saved[(module, name)] = getattr(module, name)
    transformer_module.attention = (attention_ops.attention_reference if attention == "reference"
                                    else kernel_ops.attention)
    for (module, name), value in swaps.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def variant_ops(variant: str):
    if variant == "ours":
        return contextlib.nullcontext()
    return reference_ops("reference" if variant == "plain" else "sdpa")


class Step:
    """One variant's models, optimizer and step function (built inside its variant_ops)."""

    def __init__(self, variant: str, cfg: Config, dev: torch.device, compile_backend: str,
                 regional: bool = False):
        self.variant, self.cfg, self.dev = variant, cfg, dev
        torch.manual_seed(cfg.seed)
        encoder = build_model(cfg.model, cfg.modality)
        ids = special_ids(cfg.model.vocab_size) if cfg.modality == "text" else None
        self.model = build_objective(cfg, encoder, ids).to(dev)
        self.v2 = cfg.objective.mode == "v2"
        self.teacher = EMATeacher(encoder, teacher_shared_prefixes(encoder, cfg.objective.ema_scope))
        if variant != "plain":
            torch.compiler.reset()
            compile_encoder(self.model.encoder, backend=compile_backend, regional=regional)
            compile_encoder(self.teacher.model, backend=compile_backend, regional=regional)
        if variant == "ours":
            self.optimizer = build_optimizer(self.model, cfg.optim, cfg.optim.lr, dev)
        else:  # torch's best AdamW for the device, over the same groups as ours
            best = {"fused": True} if dev.type == "cuda" else {"foreach": True}
            self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay),
                                               lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                               eps=cfg.optim.eps, **best)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else contextlib.nullcontext())
        self.model.train()

    def to_device(self, batch):
        return {k: v.to(self.dev, non_blocking=True) for k, v in batch.items()}

    def seeds(self, step: int, batch_size: int):
        # through pinned memory, non_blocking, as the trainer's feed copies them: from pageable
        # memory the copy would synchronize the host with the device every step
        return host_to_device(sample_seeds(self.cfg.seed, step, torch.arange(batch_size),
                                           STREAM_MASK), self.dev)

    def update(self, masked):
        """Grad scaling and clipping (multi-tensor for every variant), then the optimizer."""
        o = self.cfg.optim
        max_norm = o.clip_norm if o.clip_norm > 0 else float("inf")
        torch._foreach_mul_([p.grad for p in self.params if p.grad is not None],
                            1.0 / masked.clamp(min=1.0))
        torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        self.optimizer.step()

    def ema(self, decay: float = 0.999):
        self.teacher.update(self.model.encoder, decay)  # one multi-tensor lerp for every variant

    def __call__(self, cpu_batch, step: int) -> torch.Tensor:
        batch = self.to_device(cpu_batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp:
            out = self.model(batch, self.teacher.model, self.seeds(step, cpu_batch["source"].shape[0]))
        out.loss_sum.backward()
        self.update(out.masked)
        self.ema()
        return out.loss_sum.detach()

    def phased(self, cpu_batch, step: int, mark) -> None:
        """The same work as __call__, phase by phase, calling mark(phase) after each."""
        cfg, model, teacher = self.cfg, self.model, self.teacher.model
        o, m = cfg.objective, cfg.masking
        batch = self.to_device(cpu_batch)
        seeds = self.seeds(step, cpu_batch["source"].shape[0])
        self.optimizer.zero_grad(set_to_none=True)
        mark("loader")
        n_extra = model.encoder.num_extra_tokens
        with self.amp:
            source, pad = batch["source"], batch.get("padding_mask")
            if cfg.modality == "text":
                ids = model.special_ids
                special = (source == ids["bos"]) | (source == ids["pad"]) | (source == ids["eos"])
                masked_source, selected = d2v_module.token_mask(
                    source, m.mask_prob, special, ids["mask"], cfg.model.vocab_size, seed=seeds,
                    span=m.mask_length, replace=tuple(m.replace),
                    random_exclude=tuple(ids[k] for k in ("bos", "pad", "eos", "unk", "mask")))
                mask = selected & (masked_source == ids["mask"])
                mark("masking")
                with torch.no_grad():
                    t_x, t_pad = teacher.embed(source, pad)
                    t_out = teacher.encode(t_x, t_pad, return_layers=True,
                                           skip_padded_queries=teacher_may_skip_padding(o))
                mark("teacher")
                x, x_pad = model.encoder.embed(masked_source, pad)
                mark("student")  # the timer adds up every segment of one name
            else:
                x, x_pad = model.encoder.embed(source, pad)
                mark("student")
                mask = model.make_mask(source, pad, x_pad, seeds, x.shape[1])
                mark("masking")
                with torch.no_grad():
                    t_out = teacher.encode(x.detach(), x_pad, return_layers=True,
                                           skip_padded_queries=teacher_may_skip_padding(o))
                mark("teacher")
            with torch.no_grad():
                per_block = t_out.layer_results if o.layer_output == "ffn" else t_out.block_results
                targets = d2v_module.teacher_targets(
                    [y[:, n_extra:] for y in per_block[-o.top_k:]], t_pad if cfg.modality == "text"
                    else x_pad, layer_norm=o.layer_norm, final_norm=o.final_norm,
                    instance_norm_padding=o.instance_norm_padding)
            mark("targets")
            student = model.encoder.encode(x, x_pad, mask=None if cfg.modality == "text" else mask,
                                           skip_padded_queries=True)
            pred = model.head(student.x[:, n_extra:][mask]).float()
            loss = torch.nn.functional.mse_loss(pred, targets[mask], reduction="sum")
        loss.backward()
        mark("student")
        self.update(mask.sum().float())
        mark("optimizer")
        self.ema()
        mark("ema")


class PhaseTimer:
    """Accumulates per-phase milliseconds: CUDA events (no host sync inside the step) on GPU,
    perf_counter after a synchronize on CPU."""

    def __init__(self, dev: torch.device):
        self.dev, self.events, self.cpu = dev, [], dev.type != "cuda"

    def start(self):
        self.events = [("start", self._now())]

    def mark(self, name: str):
        self.events.append((name, self._now()))

    def _now(self):
        if self.cpu:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def split(self) -> dict:
        common.sync(self.dev)
        out = {}
        for (_, a), (name, b) in zip(self.events, self.events[1:]):
            ms = (b - a) * 1e3 if self.cpu else a.elapsed_time(b)
            out[name] = out.get(name, 0.0) + ms
        return out


def measure_variant(variant: str, cfg: Config, case: Case, dev: torch.device, steps: int,
                    compile_backend: str, regional: bool = False) -> dict:
    """{"step_ms", "compile_s", "phases": {phase: ms}, "loss"} for one variant (no phases for v2)."""
    with variant_ops(variant):
        step = Step(variant, cfg, dev, compile_backend, regional)
        batch = make_batch(cfg, case)
        start = time.perf_counter()
        loss = step(batch, 0)  # compiles
        common.sync(dev)
        compile_s = time.perf_counter() - start
        step(batch, 1)
        common.sync(dev)
        start = time.perf_counter()
        for i in range(steps):
            step(batch, 2 + i)
        common.sync(dev)
        step_ms = (time.perf_counter() - start) * 1e3 / steps
        timer, phases = PhaseTimer(dev), {}
        repeats = 0 if step.v2 else max(1, min(steps, 2 if regional else 5))  # breakdown passes
        for i in range(repeats):
            timer.start()
            step.phased(batch, 100 + i, timer.mark)
            for name, ms in timer.split().items():
                phases[name] = phases.get(name, 0.0) + ms / repeats
    return {"step_ms": step_ms, "compile_s": compile_s, "phases": phases, "loss": float(loss)}


# Every variant measured in this process: a later case (run_all's plan measures plain last)
# compares against ours without measuring it again.
_done: dict = {}


def bench_modality(name: str, case: Case, dev: torch.device, steps: int, compile_backend: str,
                   peak_tflops: float, variants=VARIANTS, regional: bool = False, emit=None,
                   info: dict | None = None) -> None:
    """Measures ours and `variants` one after the other, calling emit(record) as each is done:
    ours alone, then ours against each peer, then the phase breakdown against plain (once plain
    is measured). A variant measured by an earlier call is reused, its rows not emitted again.
    info, when given, receives the shape, FLOPs and each variant's timings as they come."""
    cfg = load_case(case, keep_dropout=regional)
    v2 = cfg.objective.mode == "v2"
    flops = None if v2 else step_flops(cfg, case)
    tokens = tokens_per_sample(cfg, case) * case.batch
    shape = (f"{name} B={case.batch}" + (f"x{cfg.objective.clone_batch}" if v2 else "")
             + f" T={tokens_per_sample(cfg, case)} C={cfg.model.embed_dim} L={cfg.model.depth}")
    sps = lambda r: case.batch / (r["step_ms"] / 1e3)  # noqa: E731
    mfu = lambda r: (None if flops is None  # noqa: E731
                     else flops / (r["step_ms"] / 1e3) / (peak_tflops * 1e12))
    info = {} if info is None else info
    info.update(shape=shape, flops_per_step=flops)
    info.setdefault("variants", {})
    results = {}
    for variant in dict.fromkeys(("ours",) + tuple(variants)):  # ours: measured, or from _done
        key = (name, case, dev.type, steps, compile_backend, regional, variant)
        fresh = key not in _done
        if fresh:
            _done[key] = measure_variant(variant, cfg, case, dev, steps, compile_backend, regional)
        r = results[variant] = _done[key]
        info["variants"][variant] = {**r, "samples_per_s": sps(r),
                                     "tokens_per_s": tokens / (r["step_ms"] / 1e3), "mfu": mfu(r)}
        if not fresh:
            continue  # its rows were emitted by the case that measured it
        ours = results["ours"]
        peer = None if variant == "ours" else variant
        emit(common.record(f"step/{name}", shape, sps(ours), peer,
                           None if peer is None else sps(r), "samples/s", mfu(ours), dev))
        emit(common.record(f"step/{name}", shape, tokens / (ours["step_ms"] / 1e3), peer,
                           None if peer is None else tokens / (r["step_ms"] / 1e3), "tokens/s",
                           mfu(ours), dev))
    for phase in PHASES if not v2 and "plain" in variants else ():
        peer_ms = results["plain"]["phases"].get(phase) if "plain" in results else None
        emit(common.record(f"step_phase/{name}/{phase}", shape,
                           results["ours"]["phases"].get(phase, 0.0), "plain" if peer_ms else None,
                           peer_ms, "ms", None, dev))


# ---------------------------------------------------------------------------------------------
# Encoder alone vs Hugging Face and timm


def _peers(cfg: Config) -> dict:
    """Constructors of the installed peers with our image encoder's geometry."""
    import importlib.util
    m, peers = cfg.model, {}
    if importlib.util.find_spec("transformers") is not None:
        def hf():
            from transformers import Data2VecVisionConfig, Data2VecVisionModel
            hcfg = Data2VecVisionConfig(
                hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                intermediate_size=m.ffn_dim, image_size=m.img_size, patch_size=m.patch_size,
                num_channels=m.in_chans, use_shared_relative_position_bias=m.rel_pos_bias,
                use_relative_position_bias=False, layer_scale_init_value=m.layer_scale_init or 0.1,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
                use_mean_pooling=False, add_pooling_layer=False)
            model = Data2VecVisionModel(hcfg, add_pooling_layer=False)
            return lambda x: model(pixel_values=x).last_hidden_state, model
        peers["hf_data2vec_vision"] = hf
    if importlib.util.find_spec("timm") is not None:
        def timm_vit():
            import timm
            model = timm.models.vision_transformer.VisionTransformer(
                img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                mlp_ratio=m.ffn_dim / m.embed_dim, num_classes=0, global_pool="")
            return lambda x: model.forward_features(x), model
        peers["timm_vit_b16"] = timm_vit
    return peers


def bench_encoder(case: Case, dev: torch.device, compile_backend: str, peak_tflops: float,
                  repeats: int) -> tuple[list[dict], dict]:
    cfg = load_case(case)
    cfg.model.drop_path = 0.0
    batch = make_batch(cfg, case)["source"].to(dev)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else contextlib.nullcontext())

    def fwd_bwd(fn):
        def run():
            with amp:
                out = fn(batch)
            out.float().sum().backward()
        return run

    torch.manual_seed(0)
    torch.compiler.reset()
    ours_model = build_model(cfg.model, "image").to(dev).train()
    compile_encoder(ours_model, backend=compile_backend)
    timings = {"ours": common.time_ms(fwd_bwd(lambda x: ours_model(x).x), dev, repeats, warmup=2)}
    for name, make in _peers(cfg).items():
        fn, model = make()
        model.to(dev).train()
        timings[name] = common.time_ms(fwd_bwd(fn), dev, repeats, warmup=2)
    flops = 3 * encoder_forward_flops(cfg, case.batch)
    shape = f"encoder B={case.batch} {cfg.model.img_size}px p{cfg.model.patch_size} C={cfg.model.embed_dim} L={cfg.model.depth}"
    sps = lambda ms: case.batch / (ms / 1e3)  # noqa: E731
    frac = flops / (timings["ours"] / 1e3) / (peak_tflops * 1e12)
    records = [common.record("encoder/image_fwd_bwd", shape, sps(timings["ours"]), name,
                             sps(ms), "samples/s", frac, dev)
               for name, ms in timings.items() if name != "ours"]
    if not records:
        records.append(common.record("encoder/image_fwd_bwd", shape, sps(timings["ours"]), None,
                                     None, "samples/s", frac, dev))
    return records, {"shape": shape, "ms": timings}


# ---------------------------------------------------------------------------------------------


def _settings(tiny: bool, quick: bool, steps: int | None, compile_backend: str | None):
    """(device, steps, compile backend, peak TFLOP/s, cases) of a run (module docstring)."""
    dev = common.device()
    if compile_backend is None:
        # Inductor on the GPU; on the CPU the suite check uses aot_eager (inductor's C++ compile
        # of three variants x three modalities would take most of the run).
        compile_backend = "inductor" if dev.type == "cuda" else "aot_eager"
    steps = steps or ((6 if quick else 20) if dev.type == "cuda" else (1 if quick else 2))
    if dev.type != "cuda" and "D2V_ATTENTION" not in os.environ:
        # Interpreted, our attention costs minutes per model step on the CPU; bench_attention
        # times it on its own. Masking and targets still take our (interpreted) kernels.
        os.environ["D2V_ATTENTION"] = "sdpa"
    peak, _ = common.matmul_peak_tflops(dev.type)
    cases = TINY if tiny else CASES
    if quick and dev.type != "cuda":  # make gpu-check --cpu: 2 samples (the interpreter is slow)
        cases = {name: dataclasses.replace(case, batch=2) for name, case in cases.items()}
    return dev, steps, compile_backend, peak, cases


# Expected seconds of one step case on an H100, per variant (estimates: the compile of one block
# graph per mode, train and eval, by inductor ~30-60 s cold, a few seconds from the caches of a
# warm machine; 8 steps + the breakdown ~2-5 s): ours and sdpa_compile compile, plain does not.
ESTIMATE_S = {"ours": 60.0, "sdpa_compile": 50.0, "plain": 10.0}


def cases(tiny: bool = False, quick: bool = False, modalities=None, variants=VARIANTS,
          steps: int | None = None, compile_backend: str | None = None,
          details: dict | None = None) -> list:
    """run_all's interface: one BenchCase per modality (quick: QUICK, 6 steps, regional
    compilation, the configs' dropout), its `variants` measured in order, each row emitted as
    its variant is done; then, in full runs, the image encoder alone against Hugging Face and
    timm. `details`, if given, receives the per-variant timings, breakdowns and compile times."""
    modalities = modalities or (QUICK if quick else MODALITIES)
    dev, steps, backend, peak, case_of = _settings(tiny, quick, steps, compile_backend)
    info = details if details is not None else {}
    info.update(compile_backend=backend, steps=steps,
                compile="regional (one block graph)" if quick else "whole encoders")
    out = []
    for modality in modalities:
        def run(emit, modality=modality):
            bench_modality(modality, case_of[modality], dev, steps, backend, peak, variants,
                           regional=quick, emit=emit, info=info.setdefault(modality, {}))
        label = "" if "ours" in variants else " " + "+".join(variants)
        out.append(common.BenchCase(f"step/{modality}{label}", run, tuple(
            None if v == "ours" else v for v in variants),
            sum(ESTIMATE_S[v] for v in variants)))
    if "image" in modalities and not quick:
        def encoder(emit):
            recs, info["encoder"] = bench_encoder(case_of["image"], dev, backend, peak,
                                                  repeats=10 if dev.type == "cuda" else 2)
            for rec in recs:
                emit(rec)
        out.append(common.BenchCase("step/encoder", encoder, ("hf_data2vec_vision",
                                                              "timm_vit_b16"), 120.0))
    return out


def print_details(info: dict) -> None:
    for modality in MODALITIES:
        if modality not in info:
            continue
        d = info[modality]
        flops = "no FLOP model (v2)" if d["flops_per_step"] is None else \
            f"{d['flops_per_step'] / 1e9:.3g} GFLOP per step"
        print(f"\n{d['shape']}: {flops}")
        print(f"  {'variant':<14}{'ms/step':>9}{'samples/s':>11}{'tokens/s':>11}{'MFU':>7}"
              f"{'compile s':>10}  breakdown ms ({', '.join(PHASES)})")
        for v, r in d["variants"].items():
            parts = " ".join(f"{r['phases'].get(p, 0):.2f}" for p in PHASES)
            mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"  {v:<14}{r['step_ms']:>9.2f}{r['samples_per_s']:>11.1f}"
                  f"{r['tokens_per_s']:>11.0f}{mfu:>7}{r['compile_s']:>10.1f}  {parts}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU check)")
    parser.add_argument("--quick", action="store_true", help="make gpu-check's subset")
    parser.add_argument("--modalities", default=None, help=f"subset of {MODALITIES}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile-backend", default=None)
    parser.add_argument("--json", metavar="PATH", help="also write header + records as JSON")
    args = parser.parse_args(argv)
    modalities = [m for m in (args.modalities or ",".join(QUICK if args.quick else MODALITIES))
                  .split(",") if m]
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        parser.error(f"unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
    details: dict = {}
    records = []
    for case in cases(args.tiny, args.quick, modalities, steps=args.steps,
                      compile_backend=args.compile_backend, details=details):
        case.run(records.append)
    print_details(details)
    common.print_records(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**common.header(tiny=args.tiny), "details": details, "records": records},
                      f, indent=1)
        print(f"wrote {args.json}")


@pytest.mark.benchmark(group="step")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("modality", MODALITIES)
def test_bench_step(benchmark, modality, variant):
    dev = common.device()
    case = (CASES if dev.type == "cuda" else TINY)[modality]
    cfg = load_case(case)
    backend = "inductor" if dev.type == "cuda" else "aot_eager"
    with variant_ops(variant):
        step = Step(variant, cfg, dev, backend)
        batch = make_batch(cfg, case)
        step(batch, 0)
        counter = iter(range(1, 1 << 30))

        def one():
            step(batch, next(counter))
            common.sync(dev)

        benchmark.extra_info.update(modality=modality, variant=variant,
                                    flops_per_step=None if step.v2 else step_flops(cfg, case))
        benchmark.pedantic(one, rounds=20 if dev.type == "cuda" else 2, warmup_rounds=1)


if __name__ == "__main__":
    main()
