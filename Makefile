# `make demo` and `make test` work on a fresh machine: the first call builds .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a plain `torch` would pull a multi-GB CUDA build); pyproject keeps a range.
TORCH_PIN ?= torch==2.13.0
# Real volumes used by the demo and tests ship inside these wheels: installed without
# their (heavy, unused) dependencies.
DATA_PKGS := nilearn==0.14.1 nimare==0.22.1 pydicom-data==1.0.0

.PHONY: install test test-quick lint demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# The edit loop: everything but the slow and multi-process tests (under 2 minutes).
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow and not ddp"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy medvol

demo: install
	$(BIN)/medvol demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
