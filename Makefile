# The whole set-up: `make demo` and `make test` each create .venv and install detforge into it if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch/torchvision pinned to the builds served on this kind of machine; see README "Installing".
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev,wandb,onnx,team]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/detforge demo

# Two pytest workers (one torch thread each): most tests are small trainings bound by Python overhead, so two
# processes finish the suite in a bit over half the time of one. Each test file runs whole on one worker.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
