# segtrain developer and demo commands. Both targets create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
# Test processes side by side (pytest-xdist); each takes its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint clean-demo-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/segtrain train experiment=quickstart hydra.run.dir=$(DEMO_DIR)
	$(BIN)/segtrain eval ckpt=$(DEMO_DIR)/checkpoints/best.pt hydra.run.dir=$(DEMO_DIR)/eval
	@echo ""
	@echo "Run directory: $(DEMO_DIR)"
	@echo "TensorBoard:   $(BIN)/tensorboard --logdir outputs"

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Unit and in-process tests only: no `python -m segtrain` subprocess, no long end-to-end run.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not cli and not slow"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check segtrain tests
