"""Test-session set-up.

Triton decides at import time whether it interprets kernels, so TRITON_INTERPRET=1 is set here,
before any test module imports triton, and only where no CUDA device exists: there every Triton
kernel runs (interpreted) on CPU tensors in the whole suite, the end-to-end runs included. Where
CUDA exists the kernels stay compiled: tests/test_cuda_kernels.py runs them on CUDA tensors, and the
tests that need the interpreter (CPU tensors through the Triton path) are skipped with that reason.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
