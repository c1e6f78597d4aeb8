"""The fast path's combinations on one node: CUDA graphs (compile_mode=reduce-overhead) with FSDP
refused in one line, each micro-batch a new CUDA-graph step, DALI's GPU batches handed over on a
side stream behind an event (never a host wait), a bad file found on the loader's own backend.
What needs a GPU runs there (make gpu-check: test_two_graphed_steps_draw_different_dropout)."""
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_graphs_with_fsdp_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"config key 'train.compile_mode': reduce-overhead "
                                          r"\(CUDA graphs\) needs parameters at fixed addresses"):
        load_config(ROOT / "configs/tiny_image.yaml",
                    ["train.compile=true", "train.compile_mode=reduce-overhead",
                     "train.distributed=fsdp"])
    for ok in (["train.compile=true", "train.compile_mode=reduce-overhead"],
               ["train.compile=true", "train.compile_mode=max-autotune", "train.distributed=fsdp"]):
        load_config(ROOT / "configs/tiny_image.yaml", ok)


class _Stream:
    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


def test_a_dali_gpu_batch_is_waited_for_on_the_device_by_both_streams(monkeypatch):
    """Feed takes the loader's "cuda_ready" event out of the batch, and the compute stream and
    the mask side stream wait for it (stream waits: the host never blocks)."""
    from d2v_engine.run import mask_ahead

    main, side, event = _Stream(), _Stream(), object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    batch = {"source": torch.randn(2, 3), "cuda_ready": event}
    mask_ahead.wait_for_loader(batch, batch.pop("cuda_ready"), main)
    mask_ahead.wait_for_loader(batch, event, side)
    assert main.waited == [event] and side.waited == [event] and "cuda_ready" not in batch


def test_feed_hands_the_loaders_event_to_the_streams(monkeypatch):
    from d2v_engine.run import mask_ahead

    cfg = load_config(ROOT / "configs/tiny_text.yaml", ["train.mask_ahead=false"])
    event, waited = object(), []
    monkeypatch.setattr(mask_ahead, "wait_for_loader",
                        lambda batch, loaded, stream: waited.append((loaded, stream)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "compute")

    class Objective:
        def draw_masks(self, batch, seeds):
            raise AssertionError("mask_ahead=false draws no masks ahead")

    batches = iter([{"source": torch.zeros(2, 4, dtype=torch.long), "padding_mask": None,
                     "position": torch.arange(2), "step": 0, "bad_files": [],
                     "cuda_ready": event}])
    feed = mask_ahead.Feed(batches, Objective(), cfg, torch.device("cpu"), 1, 0, 1)
    mb = feed.take()
    assert waited == [(event, "compute")] and "cuda_ready" not in mb.batch


def test_a_bad_file_is_looked_for_on_the_loaders_own_backend(monkeypatch):
    """GPU-only failures (nvJPEG's, a slice past a short file's end in the GPU graph) are found by
    decoding each in-flight sample alone in the loader's own graph, not a CPU stand-in."""
    from d2v_engine.data.dali_common import DaliLoader, Prepared

    built = []

    class Pipe:
        def run(self):
            raise RuntimeError("nvjpeg: unsupported\n C++ context: ...")

    loader = object.__new__(DaliLoader)
    loader.gpu = True
    monkeypatch.setattr(DaliLoader, "_build",
                        lambda self, feed, batch_size, gpu, prefetch: built.append(gpu) or Pipe())
    prepared = Prepared.__new__(Prepared)
    prepared.inputs = [[b"a", b"b"]]
    assert loader._decodes(prepared, 1) == "nvjpeg: unsupported"
    assert built == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_graphed_steps_draw_different_dropout():
    """compile_mode=reduce-overhead: the attention dropout seed is drawn on the device inside the
    op, so each replay of the CUDA graph draws a fresh mask (a seed frozen at recording would give
    every step the same one)."""
    from d2v_engine.models.transformer import SelfAttention
    from d2v_engine.runtime.compile import compile_fn

    torch.manual_seed(0)
    block = SelfAttention(64, 4, dropout=0.5).cuda().train()
    step = compile_fn(block, "reduce-overhead")
    x = torch.randn(8, 32, 64, device="cuda")
    outs = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            outs.append(step(x).clone())
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[-1], outs[-2]), "two replays drew the same dropout mask"
