# The two commands of the README. Both do all set-up first (scripts/setup.sh is idempotent).
# Python 3.11 in .venv by default; PYTHON=python3.12 or python3.13 (or a path ending in python3.N) uses
# that Python in its own virtualenv, .venv-3.12 / .venv-3.13 (VENV=dir overrides).
ifdef PYTHON
VENV ?= $(if $(filter python3.11,$(notdir $(PYTHON))),.venv,.venv-$(patsubst python%,%,$(notdir $(PYTHON))))
else
VENV ?= .venv
endif
export VENV
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test arm
setup:
	bash scripts/setup.sh

# Main job: train -> evaluate -> export -> verify on Fashion-MNIST (a few minutes on 2 cores).
demo: setup
	$(PY) examples/fashion_mnist_syq.py $(ARGS)

# Two pytest workers (CI has 2 cores); a file's tests stay on one worker (module fixtures run once).
# WORKERS=0 runs in one process. tests/ is the Keras 2 frontend, tests_keras3/ the Keras 3 one: two
# pytest runs, because the two frontends never share a process.
WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile tests $(ARGS)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile tests_keras3 $(ARGS)

# ARM: packed kernels on qemu-aarch64 and Cortex-M4/M33/M55 boards (bit-exactness, instruction counts;
# installs the cross toolchains/emulators when missing). ARGS=--quick for the reduced set.
arm: setup
	bash tflite/arm/run.sh $(ARGS)
