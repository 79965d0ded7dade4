# Both entry points set up .venv themselves on a fresh machine (python3 must be 3.10+; 3.11 on the
# dev/CI machines, where torch==2.13.0's CPU wheel lies on disk: .ci/constraints.txt pins it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PIP_INSTALL := $(PY) -m pip install -q -c .ci/constraints.txt
PYTEST := $(PY) -m pytest -n 2 --dist worksteal --durations=15

.PHONY: train test test-slow test-bench install clean

# The core package plus the `train` extra (TensorFlow input pipelines, optax, ...).
$(VENV)/.stamp-base: pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[train]'
	touch $@

$(VENV)/.stamp-test: pyproject.toml .ci/constraints.txt $(VENV)/.stamp-base
	$(PIP_INSTALL) -e '.[test]'
	touch $@

# JAX's CUDA plugin and cuDNN for the deviceless GPU compiles, in a folder of their own: beside
# JAX on a machine without a GPU they print lines at every `import jax` (pyproject.toml, gpu-aot).
# Their versions follow the installed jax; --no-deps keeps CUDA's other wheels (and cuBLAS, which
# cuDNN names but a compile does not load) out.
GPU_AOT := $(VENV)/gpu-aot
$(VENV)/.stamp-gpu-aot: $(VENV)/.stamp-base
	rm -rf $(GPU_AOT)
	JAX=$$($(PY) -c 'import jax; print(jax.__version__)') && \
	  $(PY) -m pip install -q --no-deps --target $(GPU_AOT) "jax-cuda12-plugin==$$JAX" \
	  "jax-cuda12-pjrt==$$JAX" 'nvidia-cudnn-cu12>=9.8,<10'
	touch $@

install: $(VENV)/.stamp-test $(VENV)/.stamp-gpu-aot

# Trains the small digits CvT from scratch (offline; the time is in the README) and prints the
# final test top-1 (>= 97%). Rerunning resumes / re-evaluates runs/digits; `make clean` starts over.
# TRAIN_ARGS adds flags, e.g. TRAIN_ARGS=--config.seed=1.
TRAIN_ARGS ?=
train: $(VENV)/.stamp-base
	$(PY) train.py --config configs/digits.py --workdir runs/digits $(TRAIN_ARGS)

# Every test but the `slow` and `bench` ones (time in the README); CI runs this and test-slow.
test: $(VENV)/.stamp-test $(VENV)/.stamp-gpu-aot
	$(PYTEST) -m "not slow and not bench" $(PYTEST_ARGS)

# The checks too long for `make test` (the README lists them); CI runs them too.
test-slow: $(VENV)/.stamp-test $(VENV)/.stamp-gpu-aot
	$(PYTEST) -m slow $(PYTEST_ARGS)

# The benchmark scripts end to end on small inputs (~5 min on 2 cores): before a benchmark's
# figures go into RESULTS.md. Outside CI, whose time budget they do not fit.
test-bench: $(VENV)/.stamp-test $(VENV)/.stamp-gpu-aot
	$(PYTEST) -m bench $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
