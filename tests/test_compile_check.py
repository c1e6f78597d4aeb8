"""benchmarks.compile_check --csrc compiles csrc/ exactly as torch's extension build does.

torch.utils.cpp_extension adds -D__CUDA_NO_HALF_CONVERSIONS__ and the other COMMON_NVCC_FLAGS to
every nvcc call; code that plain nvcc accepts (T(0.0f) for T = __half) fails there. These tests
need nvcc (CI has one), not a GPU: nvcc compiles for sm_90 anywhere. csrc/ itself is compiled that
way by `make compile-check` (a CI step).
"""
import shutil

import pytest
from torch.utils import cpp_extension

from benchmarks import compile_check
from d2v_kernels import _cuda

NVCC = compile_check.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

# What our kernels did before: a 16-bit type built from a float by its constructor.
IMPLICIT_HALF = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
template <typename T> __global__ void zero(T* out) { out[threadIdx.x] = T(0.0f); }
template __global__ void zero<__half>(__half*);
template __global__ void zero<__nv_bfloat16>(__nv_bfloat16*);
"""


@needs_nvcc
def test_the_command_is_torchs_own_flags_for_sm_90():
    command = compile_check.torch_nvcc_command(NVCC)
    flags = command[1:]
    missing = [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]
    assert not missing, f"torch's COMMON_NVCC_FLAGS missing: {missing}"
    assert "-gencode=arch=compute_90,code=sm_90" in flags, flags
    for include in cpp_extension.include_paths("cpu"):  # torch's headers: also in a CPU build
        assert include in flags, f"torch's include path {include} missing"
    assert f"-I{_cuda.CSRC}" in flags and "-DTORCH_EXTENSION_NAME=d2v_cuda" in flags
    for flag in _cuda.EXTRA_CUDA_CFLAGS:
        assert flag in flags, f"the extension's own flag {flag} missing"
    assert shutil.which(command[0]) or command[0].endswith("nvcc"), command[0]


@needs_nvcc
def test_code_plain_nvcc_accepts_and_torchs_build_rejects_fails_the_check(tmp_path, monkeypatch):
    src = tmp_path / "implicit.cu"
    src.write_text(IMPLICIT_HALF)
    monkeypatch.setattr(_cuda, "sources", lambda: [src])
    result = compile_check.compile_csrc()
    assert "error" in result, f"torch's flags accepted T(0.0f) for __half: {result}"
    assert 'no instance of constructor "__half::__half"' in result["error"], result["error"]
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in result["flags"]
    assert " -c " not in result["error"], "the reason is the command line, not the error"

