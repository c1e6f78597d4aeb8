"""torch.compile of the student and teacher encoders (train.compile, compile_mode, compile_backend).

What is compiled: each encoder's `embed` and `encode` (feature encoder, blocks, final norm), for the
student and the EMA teacher alike; the module objects, their parameters and state-dict keys stay as
they are (no `_orig_mod.` prefixes, checkpoints are interchangeable with eager runs). Masking,
teacher targets and the loss at masked positions stay eager: the loss gathers a data-dependent
number of positions, which would break the graph anyway, and our kernels there are single launches
(d2v_kernels.ops registers them as custom ops for whoever compiles a larger region). Attention is
inside the compiled encoders: its Triton path enters the graph as the d2v::attention_forward /
d2v::attention_backward op pair (dynamo would break the graph at the kernel launches), SDPA is
traced natively.

With model.layerdrop > 0 the block loop draws a random number per block on the host side of a
branch, which dynamo cannot keep in one graph; then each block is compiled on its own instead
(regional compilation: one compiled graph, reused by every block of the same shape). `regional=True`
asks for that layout without layerdrop: a fraction of the compile time (make gpu-check's step
benchmark uses it to fit its time budget).

Shapes: dynamic=False. Images are static; audio and text batches are snapped to the length buckets
of d2v_engine.planning.buckets by the trainer, so each encoder compiles once per bucket (recompile limit raised
to fit). mode="reduce-overhead" adds CUDA graphs (worth it for static shapes: image; each bucket
records its own graph); "max-autotune" also searches matmul / Triton configurations (long compile).
"""
from __future__ import annotations

import time

import torch


def _raise_recompile_limit(shapes: int) -> None:
    config = torch._dynamo.config
    want = 4 * max(1, shapes) + 8  # student + teacher, train/eval, return_layers, per bucket
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < want:
            setattr(config, name, want)


def compile_fn(fn, mode: str = "default", backend: str = "inductor"):
    """torch.compile with our choices (static shapes); mode "default" passes no mode."""
    kwargs = {"backend": backend, "dynamic": False}
    if mode != "default" and backend == "inductor":
        kwargs["mode"] = mode
    return torch.compile(fn, **kwargs)


def compile_encoder(encoder: torch.nn.Module, mode: str = "default", backend: str = "inductor",
                    shapes: int = 1, regional: bool = False) -> torch.nn.Module:
    """Compiles `encoder`'s embed and encode in place (per block with layerdrop or `regional`)."""
    _raise_recompile_limit(shapes)
    if regional or getattr(getattr(encoder, "blocks", None), "layerdrop", 0) > 0:
        for block in encoder.blocks.blocks:
            block.forward = compile_fn(block.forward, mode, backend)
        encoder.embed = compile_fn(encoder.embed, mode, backend)
        return encoder
    encoder.embed = compile_fn(encoder.embed, mode, backend)
    encoder.encode = compile_fn(encoder.encode, mode, backend)
    return encoder


def compile_student_teacher(student_encoder, teacher_encoder, train_cfg, shapes: int = 1) -> None:
    """Compiles both encoders as train.compile_mode / train.compile_backend say."""
    mode = getattr(train_cfg, "compile_mode", "default")
    backend = getattr(train_cfg, "compile_backend", "inductor")
    compile_encoder(student_encoder, mode, backend, shapes)
    compile_encoder(teacher_encoder, mode, backend, shapes)


class FirstStepTimer:
    """Times the first optimizer step (where compilation happens) once, with one device sync."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.start = time.perf_counter()
        self.seconds = None

    def stop(self) -> float | None:
        if not self.enabled or self.seconds is not None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        return self.seconds
