# Two commands set everything up on a fresh machine:
#   make demo   builds .venv, runs examples/quickstart.yaml end to end, prints its status
#   make test   builds .venv, runs ruff and the test suite (what CI runs: .ci/run)
PY ?= python3
VENV ?= .venv
# torch==2.13.0 is the CPU build; on a GPU machine use e.g. `make TORCH=torch demo` to get pip's CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint clean
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[train,test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/baton run examples/quickstart.yaml
	$(BIN)/baton status runs/quickstart

lint: $(BIN)/.installed
	$(BIN)/ruff check launcher stages tests examples bench

test: lint
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) runs
