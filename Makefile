# Two commands do all the set-up on a fresh machine:
#   make demo   install, write digits shards, train on one CPU, evaluate, predict
#   make test   install, lint, run the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned: a CUDA build that also runs on the CPU.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash launch/demo.sh

lint: install
	$(PY) -m ruff check .

# Two at a time, a test file to a process (its module fixtures made once); then the tests
# timed against a bound (marked `alone`), with the machine to themselves.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile -m "not alone"
	$(PY) -m pytest -m alone

clean:
	rm -rf $(VENV) runs/demo data/digits
