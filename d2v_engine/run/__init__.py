"""A run, start to end: the training loop (trainer.py) and what it calls: guards against non-finite
updates and collapse (guards.py), stop signals and restarts (preemption.py), the masks and copies
a micro-batch ahead (mask_ahead.py), the logs (metrics.py), one writer per run directory
(run_lock.py), the recipe check of a resume (resume_check.py).

May import: everything below it (d2v_kernels, the shared modules, runtime, data, models,
objective, planning, handoff). Not prepare or cli.
"""
