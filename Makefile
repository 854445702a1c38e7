# `make demo` and `make test` work on a fresh machine: both create .venv and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO := demo

.PHONY: venv demo test benchmark clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(BIN)/imedsam demo-data $(DEMO)/data --count 6 --size 256 320
	$(BIN)/imedsam predict --encoder vit_tiny --image $(DEMO)/data/images/synthetic_0005.png \
		--box-from-mask $(DEMO)/data/masks/synthetic_0005.png --output $(DEMO)/mask.png \
		--uncertainty $(DEMO)/uncertainty.png --overlay $(DEMO)/overlay.png
	@echo "demo outputs in $(DEMO)/: mask.png, uncertainty.png, overlay.png"

test: venv
	$(BIN)/python -m pytest -q tests

benchmark: venv
	$(BIN)/python scripts/benchmark_inference.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
