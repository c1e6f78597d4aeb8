# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# With a GPU (nvidia-smi answers) the venv sees the system's CUDA torch; without one it gets the
# CPU wheel of torch 2.13.0, so CI never downloads a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny_image.yaml
ARGS ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

# The GPU image's triton (see make gpu-check), for kernels.compile_check next to CI's own triton: a
# venv of its own holding only triton, which reads torch, numpy and yaml from $(VENV) (a .pth line).
GPU_TRITON := 3.6.0
TRITON_VENV := .venv-triton$(GPU_TRITON)
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: train test bench install clean gpu-check gpu-check-cpu compile-check

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	@if [ -z "$(HAS_GPU)" ]; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev,hf,dali,audio,tensorboard]'
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m engine.train $(CONFIG) train.probe=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(ARGS)

# On a GPU machine as it is: no venv and no pip (the GPU image has what this needs and no
# network); scripts/gpu_check.py says what it runs, within 9 minutes. gpu-check-cpu is its CI mode.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) scripts/gpu_check.py $(ARGS)

gpu-check-cpu: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py --cpu $(ARGS)

$(TRITON_STAMP): $(STAMP)
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q triton==$(GPU_TRITON)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$($(TRITON_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/d2v-torch.pth"
	@touch $(TRITON_STAMP)

# Every Triton kernel compiled for the H100 (sm_90) at the base configs' shapes, with CI's triton
# (and csrc/ with nvcc, where one is installed) and with the GPU image's triton.
compile-check: $(STAMP) $(TRITON_STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m kernels.compile_check --csrc $(ARGS)
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python -m kernels.compile_check $(ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) runs build *.egg-info
