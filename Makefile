# mlxtune — `make demo` and `make test` work from a fresh clone (they create .venv and install what they need).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UNAME  := $(shell uname -s)
ifeq ($(UNAME),Linux)
  EXTRAS := cpu,test
else
  EXTRAS := test
endif
# Linux CPU: preload OpenBLAS (tools/openblas.sh); empty elsewhere.
RUN = LD_PRELOAD="$$(bash tools/openblas.sh --path)" PYTHONUNBUFFERED=1

.PHONY: setup assets blas demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

blas:
	@bash tools/openblas.sh

assets: setup
	$(BIN)/python tools/fetch_assets.py

# Fine-tune the real SmolLM2-135M-Instruct on the bundled Alpaca seed tasks, evaluate base vs tuned, fuse, generate.
demo: setup assets blas
	$(RUN) PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: setup assets blas
	$(RUN) $(BIN)/python -m pytest -q --timeout=600 tests

clean:
	rm -rf $(VENV) .assets runs .pytest_cache
