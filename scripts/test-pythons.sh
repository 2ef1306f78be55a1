#!/usr/bin/env bash
# The unit tests and the worker/call/event smoke (tests/integration/test_smoke.py) on every supported Python
# but the default one (make test runs the whole suite on that), as `make test-pythons` does.
#
# Each version gets a venv of its own, .venv-3.X, made from ~/.pyenv/versions/3.X.*/bin/python
# (else python3.X on PATH), with amqprpc installed the way a user installs it: from a wheel built
# from this checkout, with the [test] extra (pip, from the package index: no other network).
# The tests run from tests/, so `import amqprpc` is the installed wheel, not the checkout.
#
# The versions run in PYTHON_JOBS lanes at a time (default 2: one per core; the work is CPU-bound,
# pip and the unit tests), the versions dealt round-robin to the lanes; each version's output is
# printed whole when it ends. One RabbitMQ node serves every smoke, a vhost of its own per lane
# (the smoke uses fixed service names: two at once on one vhost would take each other's messages).
#
#   scripts/test-pythons.sh              # 3.9 3.10 3.12 3.13
#   scripts/test-pythons.sh 3.9 3.13     # those only
#   PYTHON_JOBS=1 scripts/test-pythons.sh   # one after the other
set -euo pipefail
cd "$(dirname "$0")/.."
versions=(${*:-3.9 3.10 3.12 3.13})
lanes=${PYTHON_JOBS:-2}
[ "$lanes" -ge 1 ] 2>/dev/null || { echo "error: PYTHON_JOBS must be a number >= 1" >&2; exit 2; }
[ "$lanes" -le "${#versions[@]}" ] || lanes=${#versions[@]}
builder=${BUILD_PYTHON:-.venv/bin/python}  # builds the wheel and runs the shared RabbitMQ node
builder=$(cd "$(dirname "$builder")" && pwd)/$(basename "$builder")
out=$PWD/build/pythons  # each version's output, and the node's state files
rm -rf "$out"
mkdir -p "$out"

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

node() {  # start LANES | stop: the shared node (state in $out/node.json, lane N's vhost in $out/node-N.json)
  (cd tests/apps && "$builder" -c "import sys
from rabbit_node import RabbitNode
state = sys.argv[2]
if sys.argv[1] == 'start':
    node = RabbitNode(label='pythons')
    node.start()
    node.save(state)
    base = node.url[:-1]  # amqp://guest:guest@127.0.0.1:PORT/ (the default vhost is the last /)
    for lane in range(int(sys.argv[3])):
        node.ctl('add_vhost', f'lane{lane}')
        node.ctl('set_permissions', '-p', f'lane{lane}', 'guest', '.*', '.*', '.*')
        node.url = f'{base}lane{lane}'
        node.save(state.replace('.json', f'-{lane}.json'))
else:
    RabbitNode.attach(state).stop()" "$1" "$out/node.json" "${2:-}")
}

version_run() {  # one version: its venv (made or refreshed), then its tests; output to $out/3.X.log
  local version=$1 python venv started
  started=$(date +%s)
  python=$(interpreter "$version") || return 1
  venv=.venv-$version
  if [ ! -f "$venv/.installed" ] || [ setup.cfg -nt "$venv/.installed" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv" || return 1
    pip_quietly "$venv/bin/pip" install -q --upgrade pip || return 1
    pip_quietly "$venv/bin/pip" install -q "$wheel[test]" || return 1
    touch "$venv/.installed"
  else
    pip_quietly "$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel" || return 1
  fi
  echo "== Python $version ($("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'), $venv)"
  if (cd tests && "../$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not integration or smoke"); then
    echo "== Python $version: passed in $(( $(date +%s) - started )) s"
  else
    echo "== Python $version: FAILED"
    return 1
  fi
}

lane() {  # N: every PYTHON_JOBS-th version from the N-th, one after the other, on vhost laneN
  local n=$1 status=0 i
  export AMQPRPC_TEST_RABBIT_NODE=$out/node-$n.json
  for ((i = n; i < ${#versions[@]}; i += lanes)); do
    version_run "${versions[i]}" >"$out/${versions[i]}.log" 2>&1 || status=1
    flock "$out/.print" cat "$out/${versions[i]}.log"  # whole, never interleaved with the other lane's
  done
  return $status
}

set -m  # each lane in a process group of its own: stopped whole (its pip or pytest too) on an interrupt
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ ! -f "$out/node.json" ] || node stop
}
pids=()
trap stop_all EXIT
trap 'exit 130' INT TERM  # (else bash waits for the lanes to end before it acts on the signal)
# The node boots (a few seconds) while the wheel is built.
node start "$lanes" &
starting=$!
pip_quietly "$builder" -m pip wheel -q --no-deps -w "$out/wheel" .
wheel=$(ls "$out"/wheel/amqprpc-*.whl)
wait "$starting" || { echo "error: the RabbitMQ node for the smoke did not start" >&2; exit 1; }

for ((n = 0; n < lanes; n++)); do
  lane "$n" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
pids=()
[ $status -eq 0 ] || echo "== some Python FAILED (each one's output: $out/3.X.log)" >&2
exit $status
