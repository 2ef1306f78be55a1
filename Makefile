# `make demo` and `make test` work on a fresh machine: each creates .venv, installs the
# package with its test extras, and starts RabbitMQ/Redis when installed but not running.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck lint test-pythons test-rabbitmq4 bench bench-peers services clean web docs

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

# mypy --strict over amqprpc/ and workers/ (the settings are in setup.cfg); CI runs it before the suites.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# ruff over the package and the shop (rules in pyproject.toml); CI runs it beside mypy.
lint: $(STAMP)
	$(VENV)/bin/ruff check amqprpc workers

# Python 3.9-3.13: the unit tests and a worker/call/event smoke on every version but $(PYTHON)'s,
# each in its own .venv-3.X installed from a wheel of this checkout (PYTHONS="3.9 3.13" for some).
PYTHONS ?= 3.9 3.10 3.12 3.13
test-pythons: $(STAMP) services
	BUILD_PYTHON=$(VENV)/bin/python ./scripts/test-pythons.sh $(PYTHONS)

# The integration tests (-m integration: every test that talks to a broker) against a RabbitMQ 4.x
# node of its own (scripts/rabbitmq4.sh installs 4.x once per machine into a cached folder, a few
# minutes; tests/apps/rabbit_node.py runs the node beside the system's, on free ports). own_broker and
# the cluster tests then run 4.x nodes too. The unit tests touch no broker: make test runs them (~30 s
# saved here); a -m of PYTEST_ARGS replaces this one (PYTEST_ARGS="-m cluster").
test-rabbitmq4: $(STAMP) services
	root=$$(./scripts/rabbitmq4.sh) && $(VENV)/bin/python tests/apps/rabbit_node.py --root "$$root" -- \
		$(VENV)/bin/python -m pytest -q -m integration $(PYTEST_ARGS)

# The documentation site from docs/ into site/ (mkdocs.yml): --strict fails on a broken link, anchor
# or API reference. Its tools are the [docs] extra, installed into .venv once (DOCS_STAMP).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) setup.cfg
	$(VENV)/bin/pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: $(STAMP) services
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# Other frameworks beside amqprpc (aio-pika JsonRPC, Celery rpc://): installs the `bench` extra first.
bench-peers: $(STAMP) services
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python -m bench.peers $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info .pytest_cache site
