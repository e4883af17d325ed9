# Two commands do everything on a fresh machine:
#   make train   — set up .venv (only when missing or stale) and train the default model offline
#   make test    — set up the same way and run the test suite
# Extra arguments: make train ARGS="model=protopnet data=breastmnist"; make test PYTEST_ARGS="-k contract"

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup train test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import zoo, torch, lightning, hydra" && touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@# *_table.py scripts train many models (tens of minutes): run them by hand.
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf logs outputs .pytest_cache
