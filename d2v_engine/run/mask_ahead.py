"""Micro-batches for the training loop, each moved to the device with its masks drawn one ahead.

A micro-batch's masks depend only on its inputs and its per-sample seeds (run seed, step, global
sample position: d2v_engine.seeding), never on the weights, so they can be drawn before the step
that uses them. `Feed.prefetch()` takes the next micro-batch from the loader, copies it to the
device and draws its masks (objective.draw_masks) on a side CUDA stream, then records an event;
the trainer calls it right after enqueueing the current micro-batch's backward, so the GPU runs the
copies and the mask kernels next to that backward. `Feed.take()` makes the compute stream wait
for the event (on the device: the host never waits for the compute stream) and returns the
micro-batch. data2vec 2.0's shared masked count sizes the step's gathers, so the host needs it:
the side stream copies it to pinned memory and take() waits for that event, recorded a whole
forward and backward earlier (done by then). The masks are bit for bit those the step would draw
itself (tests/test_mask_ahead.py).

Without CUDA the stream is a no-op context: the same calls, in order. train.mask_ahead=false draws
the masks in the step instead (the copies stay here, on the compute stream).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from d2v_engine.planning.buckets import bucket_batch
from d2v_engine.data.common import stand_in_batch
from d2v_engine.data.loader import group_positions
from d2v_engine.models.visible import shared_count
from d2v_engine.seeding import STREAM_MASK, sample_seeds


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor made in the step on `device`: to CUDA through pinned memory, non_blocking (a
    copy from pageable memory would synchronize the host with the device every micro-batch)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; host tensors go to CUDA through pinned memory (the
    loader's are pinned already; bucket padding and stand-ins make new ones)."""
    return {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class MicroBatch:
    step: int
    micro: int
    batch: dict  # on the device
    seeds: torch.Tensor  # B int64 mask seeds, on the device
    masks: dict | None  # objective.draw_masks(batch, seeds); None: drawn in the step
    weight: float  # 0: a stand-in for a micro-batch whose every file was bad
    bad_files: list = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # recorded on the side stream after the masks
    count_range: torch.Tensor | None = None  # host copy of masks["row_counts"] (data2vec 2.0)


class Feed:
    """The micro-batches of steps [start_step, stop) in order, one prepared ahead."""

    def __init__(self, batches, objective, cfg, device: torch.device, accumulation: int,
                 start_step: int, stop: int, buckets=(), pad_value: int = 0,
                 crop_group: int = 0):
        self.batches, self.objective, self.cfg, self.device = batches, objective, cfg, device
        self.buckets, self.pad_value, self.crop_group = buckets, pad_value, crop_group
        self.order = ((s, m) for s in range(start_step, stop) for m in range(accumulation))
        self.ahead = cfg.train.mask_ahead
        self.stream = torch.cuda.Stream(device) if self.ahead and device.type == "cuda" else None
        self.stand_in = None  # the last good micro-batch (host), for a fully bad one
        self.data_wait = 0.0  # seconds spent waiting for the loader since the last reset
        self._next: MicroBatch | None = None

    def take(self) -> MicroBatch:
        """The next micro-batch, its copies and masks ordered before this stream's later work."""
        self.prefetch()
        mb, self._next = self._next, None
        if mb.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(mb.ready)
            # Made on the side stream, used on this one: the allocator must not reuse them before
            # this stream is done with them.
            for t in _tensors(mb):
                t.record_stream(main)
        if mb.count_range is not None:
            if mb.ready is not None:
                # Enqueued a whole forward and backward ago: long done, this waits for nothing
                # (an event, not a stream synchronization: the compute stream runs on).
                mb.ready.synchronize()
            mb.masks["masked_count"] = shared_count(mb.count_range)
        return mb

    def prefetch(self) -> None:
        """Prepares the next micro-batch (if any, and not yet prepared): loader, device copies and
        masks, on the side stream."""
        if self._next is not None:
            return
        step, micro = next(self.order, (None, None))
        if step is None:
            return
        wait_start = time.perf_counter()
        batch = next(self.batches)
        self.data_wait += time.perf_counter() - wait_start
        # DALI's GPU batches were copied on the loader's own stream: this stream, and below the
        # side stream, wait for that on the device (never the host), and keep the memory alive.
        loaded = batch.pop("cuda_ready", None)
        if loaded is not None:
            wait_for_loader(batch, loaded, torch.cuda.current_stream(self.device))
        bad_files, weight = batch["bad_files"], 1.0
        if "source" not in batch:
            # Every file of this micro-batch was skipped: a stand-in (this rank's last good
            # micro-batch) runs with its loss times 0, so the collectives of DDP/FSDP still see
            # every rank and the step learns only from the samples that were read.
            batch, weight = self.stand_in or stand_in_batch(self.cfg.modality, self.cfg.data), 0.0
        if self.buckets:  # a few shapes for the compiled encoders (d2v_engine.planning.buckets)
            batch = bucket_batch(batch, self.buckets, self.pad_value)
        if weight:
            self.stand_in = batch
        seeds = sample_seeds(self.cfg.seed, step, batch["position"], STREAM_MASK)
        if self.crop_group:  # audio: the crop group's masked count (d2v_engine.data.audio)
            group_seeds = sample_seeds(self.cfg.seed, step,
                                       group_positions(batch["position"][0], self.crop_group),
                                       STREAM_MASK)
            batch = {**batch, "group_seeds": group_seeds}
        # The side stream waits for nothing: its inputs are pinned host memory and what it
        # allocates comes from its own pool of the caching allocator.
        side = torch.cuda.stream(self.stream) if self.stream is not None else None
        with side or contextlib.nullcontext():
            if loaded is not None and self.stream is not None:
                wait_for_loader(batch, loaded, self.stream)
            batch = to_device(batch, self.device)
            seeds = host_to_device(seeds, self.device)
            masks = self.objective.draw_masks(batch, seeds) if self.ahead else None
            counts = None
            if masks is not None and "row_counts" in masks:
                # data2vec 2.0's shared masked count, for the host: copied here, read in take().
                counts = torch.empty(2, dtype=torch.long, pin_memory=self.stream is not None)
                counts.copy_(masks["row_counts"], non_blocking=True)
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        self._next = MicroBatch(step, micro, batch, seeds, masks, weight, bad_files, ready,
                                counts)


def wait_for_loader(batch: dict, loaded: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
    """`stream` waits (on the device) for the loader's copies of `batch`, whose CUDA tensors the
    allocator then keeps until `stream` is done with them."""
    stream.wait_event(loaded)
    for v in batch.values():
        if torch.is_tensor(v) and v.is_cuda:
            v.record_stream(stream)


def _tensors(mb: MicroBatch):
    yield mb.seeds
    for part in (mb.batch, mb.masks or {}):
        yield from (v for v in part.values() if torch.is_tensor(v) and v.is_cuda)
