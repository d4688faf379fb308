# zerodown: the two commands that matter are `make demo` and `make test`.
# Both install whatever is missing (idempotently) before doing their job.

VENV        := .venv
BIN         := $(VENV)/bin
PYTHON      ?= python3
APT_PACKAGES := haproxy mariadb-server libodbc2 unixodbc tdsodbc
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages demo test test-fast lint lab-up lab-down bench clean

install: system-packages $(VENV)/.installed

# Debian packages: apt-get update only when something is actually missing.
system-packages:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: install
	$(BIN)/zerodown demo

# Three pytest workers, each with its own lab and dev server (tests/conftest.py claims free
# ports per session); worksteal keeps the long end-to-end tests from piling up on one. Three
# on two cores: the tests mostly wait (servers, timers, probes, drains), so a third keeps the
# cores busy - measured 2026-12-07, the whole suite 438 s with three, 524 s with two (same
# results); the unit and workflow layers 48 s against 60 s.
PYTEST_PARALLEL := -n 3 --dist worksteal

test: install lint
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

# The unit and workflow layers only (no lab; tests/conftest.py marks each test's layer from
# its fixtures): a minute or less.
test-fast: install
	$(BIN)/pytest -q $(PYTEST_PARALLEL) -m "unit or workflow"

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .

lab-up: install
	$(BIN)/zerodown lab up

lab-down:
	$(BIN)/zerodown lab down

bench: install
	$(BIN)/python -m bench.rolling_deploy
	$(BIN)/python -m bench.secret_server
	$(BIN)/python -m bench.ox_upgradeschemata
	$(BIN)/python -m bench.minor_blue_green
	$(BIN)/python -m bench.major_maintenance_window
	$(BIN)/python -m bench.many_runs
	$(BIN)/python -m bench.chaos

clean: lab-down
	rm -rf .lab
