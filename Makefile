# `make demo` and `make test` work on a fresh machine: both create .venv and install the project into it
# with every extra (tests and the MONAI Label app).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-all
DEMO_EPOCHS ?= 8

.PHONY: venv demo test benchmark clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[all]"
	touch $@

# The demo trains the bundle's vit_tiny model on generated polyp-like images (CPU, small sizes so it takes a
# few minutes), evaluates it and draws overlays: image, ground truth, prediction, box, uncertainty.
demo: venv
	$(BIN)/python -m monai.bundle run training --config_file bundle/configs/train.yaml \
		--image_size 128 --label_size 128 --max_epochs $(DEMO_EPOCHS)
	$(BIN)/python -m monai.bundle run --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
		--image_size 128 --label_size 256
	@echo "demo: model in bundle/models/model.pt; Dice in bundle/eval/summary.json; overlays in bundle/eval/overlays/"

test: venv
	$(BIN)/python -m pytest -q tests

benchmark: venv
	$(BIN)/python scripts/benchmark_inference.py
	$(BIN)/python scripts/benchmark_training.py

clean:
	rm -rf $(VENV) .pytest_cache bundle/models bundle/eval bundle/demo_data
