"""Our kernels: targets, masking, attention (Triton) and the csrc extension's loader."""
from d2v_kernels import _interpreter

_interpreter.patch()
