# cluster_glip: every command a person needs, each doing its own set-up on a fresh machine.
#   make demo   a short CPU run of the package's main job; prints where its outputs went
#   make test   notebooks and library in step, notebook tests, then pytest
#   make notebooks   re-execute every notebook and keep its outputs (what the docs show)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
CONSTRAINTS := .ci/constraints.txt

.PHONY: install test check-sync nbtest pytest demo gallery notebooks clean-nbs docs preview

$(STAMP): setup.py settings.ini $(CONSTRAINTS)
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(STAMP)

## The notebooks are the source: exporting and cleaning them must leave the tree exactly as committed.
check-sync: install
	@before=$$(git status --porcelain -uall; git diff | sha1sum); \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean; \
	after=$$(git status --porcelain -uall; git diff | sha1sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export / nbdev_clean changed the tree: notebooks and library are out of step (commit their output):"; \
	  git status --porcelain -uall; git --no-pager diff --stat; exit 1; \
	fi; echo "notebooks and library in step; notebooks clean"

# Cells flagged `cuda` (settings.ini: tst_flags) run only where a GPU exists; elsewhere the skip is listed.
nbtest: install
	@flags=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else '')"); \
	if [ -z "$$flags" ]; then \
	  echo "no GPU here: cells flagged 'cuda' are skipped:"; \
	  for nb in $$(grep -rlE '"#\| *cuda' nbs --include='*.ipynb' || true); do \
	    echo "  SKIPPED $$(grep -cE '"#\| *cuda' $$nb) cuda cell(s) in $$nb"; done; \
	fi; \
	echo "nbdev_test --flags '$$flags'"; \
	scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	TMPDIR=$$scratch OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing --flags "$$flags" --skip_folder_re '^(_|\.|experiments$$)'

# Notebooks and tests write their runs (checkpoints: gigabytes in all) under a scratch TMPDIR removed at the end.
pytest: install
	scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; TMPDIR=$$scratch $(BIN)/python -m pytest tests -q -rs

test: check-sync nbtest pytest

DEMO_OUT ?= runs/demo
# A cluster-masked pre-training of a tiny CLIP on the synthetic captioned data, on CPU, then its held-out evaluation.
demo: install
	$(BIN)/python -m cluster_glip.demo --out_dir $(DEMO_OUT)

# The masking gallery: random, Gaussian and cluster masks on real photographs, with figures (papermill).
gallery: install
	mkdir -p $(DEMO_OUT)/gallery
	$(BIN)/papermill nbs/experiments/mask_gallery.ipynb $(DEMO_OUT)/gallery/mask_gallery.ipynb -p out_dir $(DEMO_OUT)/gallery --no-progress-bar
	@echo "gallery: executed notebook $(DEMO_OUT)/gallery/mask_gallery.ipynb; figures and mask_stats.json in $(DEMO_OUT)/gallery/"

# Every notebook executed with its outputs kept (numbers and PNG figures under the examples), then cleaned as nbdev keeps
# them: what the committed notebooks and the docs show. The experiment notebooks run a tiny CPU job (devtools/execute_nbs.py).
notebooks: install
	$(PY) devtools/execute_nbs.py
	$(BIN)/nbdev_clean

clean-nbs: install
	$(BIN)/nbdev_clean

# Needs Quarto (the GitHub deploy workflow has it); not available on the CPU development machines.
docs: install
	$(BIN)/nbdev_docs

# The docs without Quarto: every notebook rendered to HTML with nbconvert in _preview/ (git ignores it); open
# _preview/index.html. The published site is still Quarto's (`make docs`, the GitHub workflow).
preview: install
	$(PY) devtools/preview.py --out _preview
