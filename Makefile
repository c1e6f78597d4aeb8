# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# Both install the exact versions of requirements-lock.txt (what a green run resolved), then this
# checkout without its dependencies: a fresh machine next month gets what CI tested. With a GPU
# (nvidia-smi answers) the venv sees the system's CUDA torch and the lock's torch and triton lines
# are left out; without one it gets the lock's CPU wheel of torch, so CI never downloads a
# multi-GB CUDA build. `make lock` re-resolves the newest releases and rewrites the lock;
# `make test-latest` tests the newest releases without the lock (see scripts/latest.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
EXTRAS := dev,hf,dali,audio,tensorboard
CONFIG ?= configs/tiny_image_v2.yaml
ARGS ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# The venv of the newest releases: built anew by every `make test-latest` / `make lock`.
LATEST_VENV := .venv-latest
LATEST_TORCH := 2.13.0

# The GPU image's triton (see make gpu-check), for benchmarks.compile_check next to CI's own
# triton: a venv of its own holding only triton, which reads torch, numpy and yaml from $(VENV)
# (a .pth line).
GPU_TRITON := 3.6.0
TRITON_VENV := .venv-triton$(GPU_TRITON)
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: train test test-latest lock bench install clean gpu-check gpu-check-cpu \
	gpu-check-cpu-image compile-check

$(STAMP): setup.py $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	$(if $(HAS_GPU),grep -vE '^(torch|triton)==' $(LOCK) > $(VENV)/lock.txt,cp $(LOCK) $(VENV)/lock.txt)
	$(PY) -m pip install -q -r $(VENV)/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m d2v_engine.cli.train $(CONFIG) train.probe=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# Every dependency at its newest release (torch: the CPU build $(LATEST_TORCH), as the lock), this
# project installed from a wheel, and the tests marked `latest` run from outside the checkout; a
# failure names the packages newer than the lock that its traceback passes through.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(LATEST_TORCH) '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/python scripts/latest.py check $(ARGS)

# Re-resolve: the newest releases, checked by test-latest, written to $(LOCK) (then run make test
# on the new lock, and commit it).
lock: test-latest
	$(LATEST_VENV)/bin/python scripts/latest.py freeze --out $(LOCK)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(ARGS)

# On a GPU machine as it is: no venv and no pip (the GPU image has what this needs and no
# network); scripts/gpu_check.py says what it runs, within 9 minutes, and writes every log and
# result under --out (default $OUT, else gpu-check-out/<date-time>). gpu-check-cpu is its CI
# mode; gpu-check-cpu-image runs that mode under the GPU image's triton ($(GPU_TRITON)) and the
# newest numpy (the image's pins; torch stays the lock's CPU build, the image's CUDA 2.11 has no
# CPU wheel to match), in the triton venv of compile-check.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) scripts/gpu_check.py $(ARGS)

gpu-check-cpu: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py --cpu $(ARGS)

gpu-check-cpu-image: $(TRITON_STAMP)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade numpy
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python scripts/gpu_check.py --cpu $(ARGS)

$(TRITON_STAMP): $(STAMP)
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q triton==$(GPU_TRITON)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$($(TRITON_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/d2v-torch.pth"
	@touch $(TRITON_STAMP)

# Every Triton kernel compiled for the H100 (sm_90) at the base configs' shapes, with CI's triton
# (and csrc/ with nvcc, where one is installed) and with the GPU image's triton.
compile-check: $(STAMP) $(TRITON_STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.compile_check --csrc $(ARGS)
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python -m benchmarks.compile_check $(ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(LATEST_VENV) runs build *.egg-info .gpu-cache gpu-check-out
