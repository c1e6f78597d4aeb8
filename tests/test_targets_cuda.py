"""The CUDA C++ teacher-target extension (csrc/, d2v_kernels/_cuda.py, the dispatcher's choice).

With a GPU (and nvcc or an installed d2v_cuda) the CUDA kernels are compared with the reference on
fresh inputs into a NaN-poisoned allocation; without one those tests are skipped ("needs CUDA").
Every machine checks the other half of the contract: the loader answers None with a reason, never
raises, and nothing dispatches to it.
"""
import ast
import itertools
import os
import re
import time
from pathlib import Path

import pytest
import torch

from d2v_kernels import _cuda, targets

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()
NORM_PAIRS = list(itertools.product(targets.NORMS, targets.NORMS))
# fp32 accumulation of the same (widened) inputs as the reference: only the order of the fp32 sums
# differs, a few ulp, for every input dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
needs_cuda = pytest.mark.skipif(not GPU, reason="needs CUDA")


def cuda_module():
    """The extension on a GPU machine; elsewhere asserts the graceful-None answer, returns None.
    On a GPU machine that lacks what the build needs (no nvcc, JIT off) the test is skipped with
    that reason; a build or load that raised fails it, with the compiler's error lines."""
    module, reason = _cuda.load()
    if GPU:
        if module is None and not _cuda.load_failed():
            pytest.skip(f"the CUDA extension cannot be built here: {reason}")
        assert module is not None, f"the CUDA extension failed to build or load: {reason}"
        return module
    assert module is None and isinstance(reason, str) and reason, (module, reason)
    assert _cuda.status() == f"unavailable: {reason}"
    return None


def make_layers(k, b, t, c, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        mean = torch.randn(1, 1, c, generator=g) * 3.0
        scale = torch.rand(1, 1, c, generator=g) * 2.5 + 0.5
        out.append((torch.randn(b, t, c, generator=g) * scale + mean).to(dtype).to(device))
    return out


def make_padding(b, t, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0], lengths[-1] = t, 3
    return (torch.arange(t)[None, :] >= lengths[:, None]).to(device)


def run_cuda(module, layers, pad, layer_norm, final_norm, padding="exclude"):
    """The extension's op right after a NaN block of the output's size was freed: the caching
    allocator hands that block back, so an element the kernels forget stays NaN."""
    b, t, c = layers[0].shape
    poison = torch.full((b, t, c), float("nan"), device=layers[0].device)
    del poison
    return module.teacher_targets(list(layers), pad, targets._NORM_CODE[layer_norm],
                                  targets._NORM_CODE[final_norm], 1e-5, padding == "include")


def assert_matches_reference(got, layers, pad, layer_norm, final_norm, padding="exclude",
                             what=""):
    want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm,
                                             instance_norm_padding=padding)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite output (an element was not written)"
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < TOL[layers[0].dtype], f"{what}: rel err {err:.2e}"
    if pad is not None:
        assert (got[pad] == 0).all(), f"{what}: padded steps must be 0"


# ---------------------------------------------------------------------------------------------
# Sources and build wiring (every machine)


def test_sources_exist_and_the_kernel_unit_is_torch_independent():
    names = {p.name for p in _cuda.sources()}
    assert {"targets_kernels.cu", "d2v_cuda.cpp"} <= names, names
    kernel = (ROOT / "csrc" / "targets_kernels.cu").read_text()
    header = (ROOT / "csrc" / "targets_kernels.cuh").read_text()
    for text in (kernel, header):
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), (
            "the kernel translation unit must compile with nvcc alone (no torch headers)")
    assert "__global__" in kernel and "Welford" in kernel and "Pack<T, VEC>" in kernel
    binding = (ROOT / "csrc" / "d2v_cuda.cpp").read_text()
    assert "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in binding
    assert '"teacher_targets"' in binding and '"supports"' in binding


def test_setup_builds_every_csrc_source_as_d2v_cuda():
    tree = ast.parse((ROOT / "setup.py").read_text())
    func = next(n for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name == "_cuda_extensions")
    text = ast.unparse(func)
    assert "CUDAExtension" in text and "'d2v_cuda'" in text, "setup.py must name the extension"
    assert "'csrc'" in text and "'.cu'" in text and "'.cpp'" in text, (
        "setup.py must build the .cu and .cpp files of csrc/")
    assert _cuda.MODULE_NAME == "d2v_cuda" and _cuda.CSRC == ROOT / "csrc"


def test_loader_never_raises_and_can_be_disabled(monkeypatch):
    monkeypatch.setenv("D2V_NO_CUDA_EXT", "1")
    _cuda._load_cached.cache_clear()
    try:
        assert _cuda.load() == (None, "disabled by D2V_NO_CUDA_EXT=1")
    finally:
        monkeypatch.delenv("D2V_NO_CUDA_EXT")
        _cuda._load_cached.cache_clear()
    cuda_module()


def test_broken_build_is_reported_not_raised(monkeypatch):
    def broken():
        raise OSError("nvcc exploded\nsecond line")

    monkeypatch.setattr(_cuda, "_load", broken)
    _cuda._load_cached.cache_clear()
    try:
        assert _cuda.load() == (None, "OSError: nvcc exploded")
        assert _cuda.load_failed(), "a build that raised must count as failed, not as skipped"
    finally:
        _cuda._load_cached.cache_clear()


TORCH_BUILD_ERROR = """Error building extension 'd2v_cuda': [1/3] /usr/local/cuda/bin/nvcc \
-DTORCH_EXTENSION_NAME=d2v_cuda -D__CUDA_NO_HALF_CONVERSIONS__ -c /x/csrc/targets_kernels.cu -o t.o
FAILED: targets_kernels.cuda.o
/x/csrc/targets_kernels.cu(171): error: no instance of constructor "__half::__half" matches
/x/csrc/targets_kernels.cu(171): error: no instance of constructor "__half::__half" matches
/x/csrc/targets_kernels.cu(171): error: no instance of constructor "__nv_bfloat16::__nv_bfloat16"
26 errors detected in the compilation of "/x/csrc/targets_kernels.cu".
ninja: build stopped: subcommand failed."""


def test_a_failed_build_reports_the_compilers_error_lines_not_the_command(monkeypatch):
    def broken():
        raise RuntimeError(TORCH_BUILD_ERROR)

    monkeypatch.setattr(_cuda, "_load", broken)
    _cuda._load_cached.cache_clear()
    try:
        module, reason = _cuda.load()
        assert module is None and _cuda.load_failed(), "a raised build must count as failed"
    finally:
        _cuda._load_cached.cache_clear()
    assert reason.split("; ") == [
        '/x/csrc/targets_kernels.cu(171): error: no instance of constructor "__half::__half" '
        "matches",
        '/x/csrc/targets_kernels.cu(171): error: no instance of constructor '
        '"__nv_bfloat16::__nv_bfloat16"',
        '26 errors detected in the compilation of "/x/csrc/targets_kernels.cu".'], reason
    assert "nvcc" not in reason.split("/x/")[0], "the nvcc command line leaked into the reason"


def test_an_environment_without_the_toolkit_is_not_a_failure(monkeypatch):
    monkeypatch.setenv("D2V_NO_CUDA_EXT", "1")
    _cuda._load_cached.cache_clear()
    try:
        assert _cuda.load()[0] is None and _cuda.load_failed() is False
    finally:
        _cuda._load_cached.cache_clear()


def test_a_lock_left_by_a_killed_build_is_removed_and_a_held_one_kept(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # torch's FileBaton: the builder holds it open
    try:
        assert _cuda.lock_holders(lock)[0] == [os.getpid()]
        assert not _cuda._remove_stale_lock(lock) and lock.exists(), "removed a live build's lock"
    finally:
        os.close(fd)  # the builder was killed: the file stays, nobody holds it
    assert os.getpid() not in _cuda.lock_holders(lock)[0]
    # where another user's processes cannot be read, only an old lock counts as dead
    monkeypatch.setattr(_cuda, "lock_holders", lambda path: ([], True))
    assert not _cuda._remove_stale_lock(lock) and lock.exists(), "removed a young, unknown lock"
    old = time.time() - _cuda.BUILD_CAP_S - 1
    os.utime(lock, (old, old))
    assert _cuda._remove_stale_lock(lock) and not lock.exists()
    lock.touch()  # every process readable and none holds it: dead at any age
    monkeypatch.setattr(_cuda, "lock_holders", lambda path: ([], False))
    assert _cuda._remove_stale_lock(lock) and not lock.exists(), "kept a lock nobody holds"
    assert not _cuda._remove_stale_lock(lock), "no lock: nothing to remove"


# ---------------------------------------------------------------------------------------------
# The dispatcher


def test_dispatcher_says_which_path_ran_and_never_picks_cuda_off_the_gpu(monkeypatch):
    module = cuda_module()
    device = "cuda" if GPU else "cpu"
    layers = make_layers(2, 2, 9, 16, torch.float32, seed=1, device=device)
    got = targets.teacher_targets(layers, None, "layer", "none")
    want = targets.teacher_targets_reference(layers, None, "layer", "none")
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    if module is None:
        assert targets.last_backend() == "triton"  # CPU under TRITON_INTERPRET=1
        monkeypatch.setenv("D2V_TARGETS_BACKEND", "cuda")
        with pytest.raises(ValueError, match="D2V_TARGETS_BACKEND=cuda needs CUDA tensors"):
            targets.teacher_targets(layers, None, "layer", "none")
        monkeypatch.setenv("D2V_TARGETS_BACKEND", "reference")
        targets.teacher_targets(layers, None, "layer", "none")
        assert targets.last_backend() == "reference"
        assert "interpreted" in targets.describe_backend(torch.device("cpu"))
        return
    assert targets.last_backend() in ("cuda", "triton")
    chosen = targets.measured_backends()
    assert chosen and all(v["chosen"] in ("cuda", "triton") and set(v["ms"]) == {"cuda", "triton"}
                          for v in chosen.values())
    for forced in ("cuda", "triton"):
        monkeypatch.setenv("D2V_TARGETS_BACKEND", forced)
        targets.teacher_targets(layers, None, "layer", "none")
        assert targets.last_backend() == forced


def test_bad_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("D2V_TARGETS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="D2V_TARGETS_BACKEND must be one of"):
        targets.teacher_targets([torch.randn(1, 2, 4)], None, "none", "none")


# ---------------------------------------------------------------------------------------------
# CUDA numerics (GPU machines only)


@needs_cuda
@pytest.mark.parametrize("padding", ["exclude", "include"])
@pytest.mark.parametrize("layer_norm,final_norm", NORM_PAIRS)
def test_cuda_matches_reference_for_every_norm_pair(layer_norm, final_norm, padding):
    module = cuda_module()
    layers = make_layers(3, 4, 49, 96, torch.float32, seed=2)
    pad = make_padding(4, 49, seed=2)
    got = run_cuda(module, layers, pad, layer_norm, final_norm, padding)
    assert_matches_reference(got, layers, pad, layer_norm, final_norm, padding,
                             f"{layer_norm}/{final_norm}/{padding}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_norm,final_norm", NORM_PAIRS)
def test_cuda_matches_reference_at_vit_shape(dtype, layer_norm, final_norm):
    module = cuda_module()
    layers = make_layers(6, 3, 197, 768, dtype, seed=3)
    got = run_cuda(module, layers, None, layer_norm, final_norm)
    assert_matches_reference(got, layers, None, layer_norm, final_norm, what=f"{dtype}")


@needs_cuda
@pytest.mark.parametrize("k", list(range(1, 13)))
def test_cuda_matches_reference_for_k_layers(k):
    module = cuda_module()
    layers = make_layers(k, 3, 49, 64, torch.bfloat16, seed=4 + k)
    pad = make_padding(3, 49, seed=k)
    got = run_cuda(module, layers, pad, "instance", "layer")
    assert_matches_reference(got, layers, pad, "instance", "layer", what=f"K={k}")


@needs_cuda
@pytest.mark.parametrize("c", [1, 7, 100, 1000, 2048])
def test_cuda_unvectorized_and_wide_channel_counts(c):
    module = cuda_module()
    for dtype in (torch.float32, torch.bfloat16):
        layers = make_layers(2, 2, 33, c, dtype, seed=c)
        pad = make_padding(2, 33, seed=c)
        for norms in (("instance", "none"), ("layer", "layer"), ("none", "instance")):
            got = run_cuda(module, layers, pad, *norms)
            assert_matches_reference(got, layers, pad, *norms, what=f"C={c} {dtype} {norms}")


@needs_cuda
@pytest.mark.parametrize("final_norm", ["none", "layer", "instance"])
def test_cuda_instance_norm_splits_time_and_looks_ahead_fewer_samples_than_the_batch(final_norm):
    # 8 layers of 1000 steps x 768 bf16 (12 MB a sample): the statistics split T in 8 chunks
    # merged by the last task, and a sample's combine comes 1 sample after its statistics.
    module = cuda_module()
    layers = make_layers(8, 5, 1000, 768, torch.bfloat16, seed=31)
    pad = make_padding(5, 1000, seed=31)
    for padding in targets.INSTANCE_NORM_PADDING:
        got = run_cuda(module, layers, pad, "instance", final_norm, padding)
        assert_matches_reference(got, layers, pad, "instance", final_norm, padding,
                                 what=f"split T, ahead 1, {final_norm}/{padding}")


@needs_cuda
def test_cuda_reads_strided_views_and_stacked_tensors():
    module = cuda_module()
    stacked = torch.randn(4, 2, 50, 128, device="cuda").bfloat16()
    views = list(stacked.unbind(0))
    strided = [torch.randn(2, 60, 256, device="cuda")[:, 5:55, 64:192] for _ in range(3)]
    for layers in (views, strided, [v[:, ::2] for v in views]):
        got = run_cuda(module, layers, None, "instance", "layer")
        assert_matches_reference(got, layers, None, "instance", "layer", what="views")


@needs_cuda
def test_cuda_rejects_what_it_cannot_run():
    module = cuda_module()
    too_many = [torch.randn(1, 4, 8, device="cuda")] * (module.MAX_LAYERS + 1)
    assert not module.supports(too_many)
    assert not module.supports([torch.randn(1, 4, 4096, device="cuda")])
    with pytest.raises(RuntimeError, match="layers"):
        module.teacher_targets(too_many, None, 0, 0, 1e-5, False)
    with pytest.raises(RuntimeError, match="dtype"):
        module.teacher_targets([torch.ones(1, 4, 8, device="cuda", dtype=torch.float64)], None,
                               0, 0, 1e-5, False)
