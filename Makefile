# `make demo` and `make test` work on a fresh machine: each creates .venv, installs the
# package with its test extras, and starts RabbitMQ/Redis when installed but not running.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-pythons bench services clean web

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

services:
	./scripts/services.sh

demo: $(STAMP) services
	$(VENV)/bin/amqprpc demo

# The web example (FastAPI + WebSocket push) with its collector and the shop in one process (WEB_ARGS=--port 8080).
web: $(STAMP) services
	$(VENV)/bin/python examples/web/server.py --with-services $(WEB_ARGS)

test: $(STAMP) services
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Python 3.9-3.13: the unit tests and a worker/call/event smoke on every version but $(PYTHON)'s,
# each in its own .venv-3.X installed from a wheel of this checkout (PYTHONS="3.9 3.13" for some).
PYTHONS ?= 3.9 3.10 3.12 3.13
test-pythons: $(STAMP) services
	BUILD_PYTHON=$(VENV)/bin/python ./scripts/test-pythons.sh $(PYTHONS)

bench: $(STAMP) services
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info .pytest_cache
