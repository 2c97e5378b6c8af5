# One venv, one project: every target installs what it needs first, so a
# fresh clone needs nothing but python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install tools test lint bench demo clean readme-defaults

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,plot]'
	touch $(STAMP)

# Two test processes, a file each at a time: most tests wait on real daemons,
# so two share the two cores without slowing each other (measured: 198 s vs 324 s).
test: install tools
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# docker-compose checks deploy/docker-compose.yml in tests/test_deploy.py. Debian has it and pip has
# not (its last release pins PyYAML < 6): best effort, as root with apt-get. Without it that one test
# skips, and check-jsonschema (the test extra) still checks the file against the Compose Specification.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { timeout 300 apt-get install -y -qq docker-compose >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq docker-compose >/dev/null 2>&1; }; } || \
	  echo "docker-compose is not installed: tests/test_deploy.py skips its docker-compose check"; }

lint: install
	$(BIN)/ruff check protocol ps worker tests

bench: install
	$(BIN)/psctl bench pushpull --servers 1 --size 16MiB
	$(BIN)/psctl bench pushpull --servers 1 --size 1MiB
	$(BIN)/psctl bench pushpull --servers 1 --size 4KiB
	$(BIN)/psctl bench nn
	$(BIN)/psctl bench consistency --plot out/consistency.png
	$(BIN)/psctl bench scale --params 20M --servers 2 --workers 2

demo: install
	$(BIN)/psctl run deploy/examples/digits-mlp.yaml

# README's table of job-file fields, from protocol/jobspec.py: paste it between
# README's defaults markers (tests/test_cli_edges.py fails until they agree).
readme-defaults: install
	@$(BIN)/python -m protocol.jobspec --markdown

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
