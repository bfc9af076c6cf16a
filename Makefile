# Two entry points on a fresh machine: `make main` (set up + re-rank TREC DL 2019 with the shipped model) and
# `make test` (set up + tests). `make table1` and `make bench` regenerate the README's results.
# TORCH pins the CPU build these machines carry; set TORCH=torch for your platform's default build.
SHELL := /bin/bash
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
MODEL ?= models/sparse-ce-minilm-l6-w4
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@# the CPU attention kernel, compiled once for this machine (models also build it on first use)
	$(VENV)/bin/sparse-ce build-kernel || echo "no CPU kernel (no compiler?): models use the PyTorch windowed backend"
	touch $@

setup: $(VENV)/.installed

test: setup
	@if command -v nvcc >/dev/null; then PYTHON=$(PY) bash kernel_src/scripts/check_cuda.sh; \
	else echo "nvcc not found: CUDA compile check skipped"; fi
	$(VENV)/bin/pytest -q

main: setup
	time -p $(VENV)/bin/sparse-ce rerank --model $(MODEL) --dl-json $(DATA)/trec-dl/bm25_top100_dl19.json \
		--qrels $(DATA)/trec-dl/qrels.dl19-passage.txt --output runs/dl19-$(notdir $(MODEL)).run

# Table 1 (controlled): train full attention and sparse w in {inf,64,16,4,1,0}, evaluate on DL19/DL20/Vaswani/SciFact
table1: setup
	PYTHON=$(PY) DATA=$(DATA) bash experiments/table1.sh models/table1

# Table 3 / Figure 2b protocol: time and memory of every attention path, the CPU kernel built first (docs/benchmarks.md)
bench: setup
	$(VENV)/bin/sparse-ce bench --data $(DATA) --output-dir benchmarks/results

.PHONY: setup test main table1 bench
