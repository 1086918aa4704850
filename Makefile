# One entry point for people and CI. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/vit-b-32-random
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install run test test-python container-test lint random-model bench bench-concurrency clean

$(VENV)/.installed: pyproject.toml requirements-torch.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-torch.txt
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## serve on $(HOST):$(PORT); CLIP_* variables configure it
	$(PY) -m app --host $(HOST) --port $(PORT)

test: test-python container-test  ## everything CI runs: lint, the test suite, then the image

test-python: install lint  ## lint, type-check and the test suite (the /docs browser test needs chromium)
	$(PY) -m pytest

container-test: install $(MODEL_DIR)/open_clip_config.json  ## build the image with podman and test it as its users run it
	PY=$(PY) CLIP_TEST_MODEL_DIR=$(abspath $(MODEL_DIR)) scripts/container/test_image.sh

lint: install
	$(PY) -m ruff check app tests load_tests
	$(PY) -m ruff format --check app tests load_tests
	$(PY) -m mypy

random-model: $(MODEL_DIR)/open_clip_config.json  ## random-weight ViT-B-32 for offline runs and benchmarks

$(MODEL_DIR)/open_clip_config.json: | install
	$(PY) -m app.tools.random_model $(MODEL_DIR)

bench-concurrency: install  ## 1 vs 16 clients on /embed and /embed/batch, against the in-process ceiling
	$(PY) -m load_tests.concurrency --model-dir $(MODEL_DIR) --clients 1,16 --endpoints embed,batch

bench: install  ## in-process benchmark per precision: JSON, Markdown and a plot in bench-results/
	$(PY) -m app.bench --model local-dir:$(MODEL_DIR) --precisions fp32,bf16,int8 --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
