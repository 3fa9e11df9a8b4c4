# Set-up and entry points. `make serve` = the main job, `make test` = the test suite; both set up first.
PYTHON ?= python3
VENV ?= .venv
# Real CIFAR-10 + pretrained weights; CI points this at ../shared/data. Unset => torchvision downloads.
GUARD_DATA_DIR ?= $(abspath ../shared/data)
export GUARD_DATA_DIR
# Keep OpenMP threads from spinning when other processes (TorchServe workers, tests) share the cores.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
PYTEST_ARGS ?= -m "not gpu"

.PHONY: setup serve stop test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e ".[serve,test]"
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/guard serve

stop: setup
	$(VENV)/bin/guard serve --stop

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/rescaler_throughput.py
