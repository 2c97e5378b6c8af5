# One venv, one project: every target installs what it needs first, so a
# fresh clone needs nothing but python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint bench demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,plot]'
	touch $(STAMP)

# Two test processes, a file each at a time: most tests wait on real daemons,
# so two share the two cores without slowing each other (measured: 198 s vs 324 s).
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: install
	$(BIN)/ruff check protocol ps worker tests

bench: install
	$(BIN)/psctl bench pushpull --servers 1 --size 16MiB
	$(BIN)/psctl bench pushpull --servers 1 --size 1MiB
	$(BIN)/psctl bench pushpull --servers 1 --size 4KiB
	$(BIN)/psctl bench nn
	$(BIN)/psctl bench consistency --plot out/consistency.png

demo: install
	$(BIN)/psctl run deploy/examples/digits-mlp.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
