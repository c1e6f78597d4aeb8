"""The machine a run is on: processes and their CPUs (distributed.py, cpu_setup.py, topology.py),
the optional accelerators and what each op dispatches to (backends.py), DDP / FSDP wrapping
(parallel.py) and torch.compile of the encoders (compile.py).

May import: d2v_kernels and d2v_engine's shared modules (config, errors, seeding, checkpoint).
"""
