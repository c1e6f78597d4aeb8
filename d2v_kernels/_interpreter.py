"""Triton 3.6's interpreter (TRITON_INTERPRET=1; the GPU image's triton) made to run our kernels.

Its interpreter turns a kernel's scalar into a Python int with int(array of shape (1,)) -- every
scalar argument is a 1-element array there --, which numpy 2.4 refuses ("only 0-dimensional
arrays can be converted to Python scalars"), so `range()` over a runtime bound fails in every
kernel (attention's key loops, the targets' chunks, the masks' draws): make gpu-check-cpu failed
under that triton. triton 3.9's interpreter squeezes the array first; `patch()` gives the older
one that conversion (the same one, where it is already there). The compiled kernels are
untouched: only the interpreter's stand-in for tl.tensor.__index__ changes.
"""
from __future__ import annotations

import os


def patch() -> None:
    """Under TRITON_INTERPRET=1, tl.tensor.__index__ squeezes its array (idempotent)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: nothing is interpreted
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "d2v_squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # through the scope, so the interpreter restores the attribute after the launch
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.d2v_squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
