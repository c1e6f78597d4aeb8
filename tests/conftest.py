"""Test-session set-up.

Triton decides at import time whether it interprets kernels, so TRITON_INTERPRET=1 is set here,
before any test module imports triton: every Triton kernel then runs (interpreted) on CPU tensors
in the whole suite, the end-to-end runs included.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
