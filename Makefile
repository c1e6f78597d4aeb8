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

.PHONY: train test bench install clean

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

clean:
	rm -rf $(VENV) runs build *.egg-info
