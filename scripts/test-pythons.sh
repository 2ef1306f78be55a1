#!/usr/bin/env bash
# The unit tests and the worker/call/event smoke (tests/integration/test_smoke.py) on every supported Python
# but the default one (make test runs the whole suite on that), as `make test-pythons` does.
#
# Each version gets a venv of its own, .venv-3.X, made from ~/.pyenv/versions/3.X.*/bin/python
# (else python3.X on PATH), with amqprpc installed the way a user installs it: from a wheel built
# from this checkout, with the [test] extra (pip, from the package index: no other network).
# The tests run from tests/, so `import amqprpc` is the installed wheel, not the checkout.
#
#   scripts/test-pythons.sh              # 3.9 3.10 3.12 3.13
#   scripts/test-pythons.sh 3.9 3.13     # those only
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${*:-3.9 3.10 3.12 3.13}
builder=${BUILD_PYTHON:-.venv/bin/python}  # builds the wheel and runs the shared RabbitMQ node
builder=$(cd "$(dirname "$builder")" && pwd)/$(basename "$builder")

interpreter() {  # 3.X -> the newest ~/.pyenv/versions/3.X.* python, else python3.X on PATH
  local found
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ]; then found=$(command -v "python$1" || true); fi
  if [ -z "$found" ]; then echo "error: no Python $1 (looked in ~/.pyenv/versions and on PATH)" >&2; return 1; fi
  echo "$found"
}

pip_quietly() {  # this machine's pip.conf names index folders that may not exist: drop those warnings
  { "$@" 2>&1; } | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

rm -rf build/wheel
pip_quietly "$builder" -m pip wheel -q --no-deps -w build/wheel .
wheel=$(ls build/wheel/amqprpc-*.whl)

# One RabbitMQ node of this run's own for every version's smoke (each would boot one otherwise).
export AMQPRPC_TEST_RABBIT_NODE=$PWD/build/rabbit-node.json
node() {  # start | stop: the shared node, found again through the state file
  (cd tests/apps && "$builder" -c "import sys
from rabbit_node import RabbitNode
if sys.argv[1] == 'start':
    node = RabbitNode(label='pythons')
    node.start()
    node.save(sys.argv[2])
else:
    RabbitNode.attach(sys.argv[2]).stop()" "$1" "$AMQPRPC_TEST_RABBIT_NODE")
}
node start
trap 'node stop' EXIT

status=0
for version in $versions; do
  python=$(interpreter "$version") || { status=1; continue; }
  venv=.venv-$version
  started=$(date +%s)
  if [ ! -f "$venv/.installed" ] || [ setup.cfg -nt "$venv/.installed" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    pip_quietly "$venv/bin/pip" install -q --upgrade pip
    pip_quietly "$venv/bin/pip" install -q "$wheel[test]"
    touch "$venv/.installed"
  else
    pip_quietly "$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel"
  fi
  echo "== Python $version ($("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'), $venv)"
  if (cd tests && "../$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not integration or smoke"); then
    echo "== Python $version: passed in $(( $(date +%s) - started )) s"
  else
    echo "== Python $version: FAILED" >&2
    status=1
  fi
done
exit $status
