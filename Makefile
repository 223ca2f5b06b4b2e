# Two entry points: `make demo` (train -> predict -> evaluate on embedded MRI) and `make test`.
# Both create .venv and install everything on a machine that has only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo
# extra `medflow train` flags for the demo; the defaults (300 steps) fit the 10-minute budget
DEMO_TRAIN_FLAGS ?=

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-gigabyte CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# stardist only for the data files its wheel carries (dsb-nuclei); its own
	# dependencies (TensorFlow-era csbdeep, numba) are not needed
	$(BIN)/python -m pip install --quiet --no-deps stardist==0.9.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medflow datasets build mni152-tissue --out $(DEMO)/mni152 --force
	$(BIN)/medflow datasets verify $(DEMO)/mni152
	$(BIN)/medflow train --data $(DEMO)/mni152 --out $(DEMO)/run --force $(DEMO_TRAIN_FLAGS)
	$(BIN)/medflow predict --model $(DEMO)/run/checkpoint_final.pt \
		--input $(DEMO)/mni152/imagesTs --out $(DEMO)/pred --force
	$(BIN)/medflow evaluate --pred $(DEMO)/pred --ref $(DEMO)/mni152/labelsTs \
		--out $(DEMO)/eval --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO)
