# The two commands of the README. Both set up everything on a fresh machine
# (a virtual environment in .venv with torch 2.13.0 CPU and every extra).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint stubs

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull the CUDA build (several GB)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the cascade demo (edge runtime + cloud gRPC server on loopback) on the embedded
# trained pair in shared/models (bench/train_pair.py wrote it; shared/models/MODEL_CARD.md).
demo: $(STAMP)
	$(BIN)/stitch demo

# The test suite: lint, then every test (GPU tests skip without a GPU).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Regenerate shared/pb from proto/ (tests/test_stubs.py fails when they are stale).
stubs: $(STAMP)
	$(BIN)/python -m stitchvlm.shared.codegen
