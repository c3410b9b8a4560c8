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

# The main job: the cascade demo (edge runtime + cloud gRPC server on loopback) on the
# embedded pair in shared/models. Until that pair is trained and committed, the demo runs on
# tiny random checkpoints built here, and says so: the plumbing is real, the answers are noise.
EMBEDDED := shared/models/synthetic-large/model.safetensors
demo: $(STAMP)
	@if [ -f $(EMBEDDED) ]; then \
		$(BIN)/stitch demo; \
	else \
		echo "NOTE: the embedded trained pair is not in shared/models yet; running on tiny RANDOM models (answers are noise)"; \
		$(BIN)/python -c "from stitchvlm.cloud.checkpoints import build_tokenizer, make_tiny_checkpoint; t = build_tokenizer(); make_tiny_checkpoint('runs/tiny-small', 'tiny', 0, tokenizer=t); make_tiny_checkpoint('runs/tiny-large', 'tiny-large', 1, tokenizer=t)"; \
		$(BIN)/stitch demo --small runs/tiny-small --large runs/tiny-large --out runs/demo; \
	fi

# The test suite: lint, then every test (GPU tests skip without a GPU).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Regenerate shared/pb from proto/ (tests/test_stubs.py fails when they are stale).
stubs: $(STAMP)
	$(BIN)/python -m stitchvlm.shared.codegen
