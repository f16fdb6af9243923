# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_CIFAR := ../shared/cifar10/cifar-10-batches-py

.PHONY: demo test lint cli-docs data setup bench gpu-proof clean

# Create the virtual environment and install kdcache (editable) with its test extras.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Link the shared copy of CIFAR-10 into data/ when it sits beside the checkout.
data:
	@if [ ! -e data/cifar-10-batches-py ] && [ -d $(SHARED_CIFAR) ]; then \
		ln -s ../$(SHARED_CIFAR) data/cifar-10-batches-py && echo "linked $(SHARED_CIFAR) -> data/cifar-10-batches-py"; fi

# The main job: a quick end-to-end run on real CIFAR-10 (teacher -> cache -> KD student vs student alone,
# and the same KD student with the teacher in the loop, for the speed-up).
demo: setup data
	$(PY) -m kdcache pipeline --preset demo --with-online --out runs/demo --force

# Lint (formatting and ruff's checks, configured in pyproject.toml), then every test tier.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: setup data lint
	$(PY) -m pytest -q

# docs/cli.md from the Typer app (Typer's `utils docs`); tests/test_cli_docs.py fails while it is stale.
cli-docs: setup
	$(PY) scripts/cli_docs.py docs/cli.md

bench: setup data
	$(PY) -m kdcache bench --teacher-arch seed-cnn-teacher --student-arch seed-cnn-student --batch-size 64 --repeats 5

# The GPU proof in one command (one H100/H200, CIFAR-10 in data/ or CIFAR=DIR, about 7 minutes):
# fast teacher (+ a second for an ensemble), 40-view mixed cache, ResNet18 students alone and distilled,
# an online row and the bench; one table, one JSON (runs/gpu-proof/proof.json). The machine's own python3
# with torch is enough: PY=python3 make gpu-proof.
CIFAR ?= data
gpu-proof:
	PYTHONPATH=. $(PY) scripts/gpu_proof.py --data-dir $(CIFAR) --out runs/gpu-proof

clean:
	rm -rf runs .pytest_cache
