# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_CIFAR := ../shared/cifar10/cifar-10-batches-py

.PHONY: demo test data setup bench clean

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

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m kdcache bench --teacher-arch seed-cnn-teacher --student-arch seed-cnn-student --batch-size 64 --repeats 5

clean:
	rm -rf runs .pytest_cache
