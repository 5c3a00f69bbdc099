# The two commands of the README. Both do all set-up first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

# Main job: train -> evaluate -> export -> verify on Fashion-MNIST (a few minutes on 2 cores).
demo: setup
	$(PY) examples/fashion_mnist_syq.py $(ARGS)

# Two pytest workers (CI has 2 cores); a file's tests stay on one worker (module fixtures run once).
# WORKERS=0 runs in one process.
WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile tests $(ARGS)
