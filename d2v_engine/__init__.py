"""d2v-engine: data2vec pretraining. The house, floor by floor; a module imports its own folder
and the floors below it, never a floor above nor another folder of its own floor
(tests/test_layout.py reads the imports and holds it to that):

    7  cli/        the command lines: d2v-train, d2v-prepare, d2v-export, d2v-probe, d2v-checkpoint
    6  run/        the training loop (trainer.py) and what it calls each step
    5  planning/   the plan before any step: batch arithmetic, FLOPs, memory, the fake step
       handoff/    the model handed on: Hugging Face export, init_from, linear probe
       prepare/    raw data checked once into what the loaders read
    4  objective/  what is learned: data2vec 1.0 and 2.0, the EMA teacher, optimizer, schedules
    3  data/       datasets and loaders (torch, DALI)
       models/     the encoders, the v2 decoder
    2  runtime/    processes, CPUs, accelerators, DDP / FSDP, torch.compile
    1  config.py, errors.py, seeding.py, checkpoint.py: shared by all
    0  d2v_kernels (its own package): masking, teacher targets, attention; reference + Triton
"""
