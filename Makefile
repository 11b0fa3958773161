# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing
# and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cprd-installed

.PHONY: demo demo-teacher test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cprd demo

# Rebuild the demo's shipped teacher (pipeline/stages/demo-teacher/README.md): a larger draw of the demo
# generator (seed 1, never the demo's own images), trained with its full caption-image relation
# as labels. One thread: on a shared machine torch's spinning threads cost more than they gain.
demo-teacher: $(STAMP)
	$(BIN)/cprd demo-data --out data/teacher-draw --train-images 4000 --val-images 200 \
		--test-images 200 --seed 1 --overwrite
	OMP_NUM_THREADS=1 $(BIN)/cprd train-teacher --data data/teacher-draw --out pipeline/stages/demo-teacher \
		--epochs 20 --easy-epochs 2 --val-images 200 --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
