# `make demo` and `make test` are the README's two commands; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipscope-installed

.PHONY: demo test lint setup browser clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,lightning,hf,tensorboard]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/clipscope reproduce --resume

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Debian's chromium renders the HTML report in a test; install it when we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null) || \
	  echo "warning: could not install chromium; the report screenshot test will be skipped"

test: $(STAMP) lint browser
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
