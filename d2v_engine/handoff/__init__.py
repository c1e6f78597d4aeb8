"""Handing the model on: the Hugging Face export (export.py) with its processors, modeling files and
model card, starting from released or exported weights (init_from.py), the linear probe
(probe.py).

May import: d2v_kernels, the shared modules, runtime, data, models, objective. Not planning,
prepare, run or cli.
"""
