"""The plan of a run before any step: batch arithmetic, data and schedules checked (plan.py), FLOPs
(flops.py) and memory (memory.py) measured on a fake step (shadow.py), length buckets for compiled
audio / text (buckets.py).

May import: d2v_kernels, the shared modules, runtime, data, models, objective.
"""
