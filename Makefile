# kmp-ops: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# dpkg-dev: dpkg-scanpackages, which indexes the stack's local apt repositories (patch-hosts)
DEMO_DEBS := openssh-server openssh-client postgresql prometheus sudo dpkg-dev
TEST_DEBS := $(DEMO_DEBS) chromium
PYTEST_ARGS ?=
# two pytest-xdist workers, whole files each, a local stack each (tests/conftest.py)
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format system-deps test-system-deps venv stack-up stack-down bench clean

demo: system-deps $(BIN)/kmpops
	$(BIN)/python -m deployments.demo

test: test-system-deps $(BIN)/kmpops
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(BIN)/kmpops
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/kmpops
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian packages: installed only when missing; none of their services is started or enabled.
system-deps:
	@./infra/install-debs.sh $(DEMO_DEBS)

test-system-deps:
	@./infra/install-debs.sh $(TEST_DEBS)

venv: $(BIN)/kmpops

$(BIN)/kmpops: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(BIN)/kmpops

stack-up: system-deps $(BIN)/kmpops
	$(BIN)/kmpops stack up

stack-down: $(BIN)/kmpops
	$(BIN)/kmpops stack down

bench: system-deps $(BIN)/kmpops
	$(BIN)/python bench/bench_fleet.py --hosts 50

clean: stack-down
	@d=$$(cat var/stack/postgres/cluster-dir 2>/dev/null); case "$$d" in /var/lib/kmpops/pg-*) rm -rf "$$d";; esac
	@h=$$(readlink var/stack/hosts 2>/dev/null); case "$$h" in /var/lib/kmpops/hosts-*) rm -rf "$$h";; esac
	rm -rf var
