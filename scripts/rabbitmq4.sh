#!/usr/bin/env bash
# A RabbitMQ 4.x install of the project's own, beside the system's RabbitMQ (never touched).
#
#   scripts/rabbitmq4.sh            create it once (cached), print its root directory
#   scripts/rabbitmq4.sh --version  create it if needed, print the RabbitMQ version in it
#
# Debian trixie's rabbitmq-server (4.x, with its Erlang) is installed with debootstrap into
# $AMQPRPC_RABBITMQ4_ROOT (default /var/cache/amqprpc/rabbitmq-4.x): outside the clone, so it
# survives between runs and clones on one machine (a cold build takes a few minutes and
# ~400 MB; later runs find it ready at once). Nodes run from it under chroot, each with its
# own nodename, ports, config, cookie and data directory (tests/apps/rabbit_node.py).
# Needs root (debootstrap, chroot); apt-get installs debootstrap when it is missing.
set -euo pipefail

ROOT="${AMQPRPC_RABBITMQ4_ROOT:-/var/cache/amqprpc/rabbitmq-4.x}"
SUITE="${AMQPRPC_RABBITMQ4_SUITE:-trixie}"
READY="$ROOT/.amqprpc-ready"

log() { echo "rabbitmq4: $*" >&2; }

apt_install() {  # apt may be locked by another install on this machine: wait and retry
  for attempt in $(seq 1 60); do
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; then return 0; fi
    if [ "$attempt" = 1 ]; then apt-get update -q >&2 || true; fi
    log "apt-get install $* failed (locked by another install?); retrying in 10 s"
    sleep 10
  done
  return 1
}

build() {
  command -v debootstrap >/dev/null || apt_install debootstrap
  if [ ! -e "/usr/share/debootstrap/scripts/$SUITE" ]; then
    # An older debootstrap knows the suite's layout under the name of its predecessor.
    ln -s sid "/usr/share/debootstrap/scripts/$SUITE"
  fi
  local work="$ROOT.partial"
  rm -rf "$work"
  mkdir -p "$(dirname "$ROOT")"
  log "installing Debian $SUITE's rabbitmq-server into $ROOT (a few minutes, once per machine)"
  local began=$SECONDS
  debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$work" >"$work.log" 2>&1 || {
    tail -30 "$work.log" >&2; log "debootstrap failed (full log: $work.log)"; return 1; }
  # Nodes are started by hand (tests/apps/rabbit_node.py), never by the package's service.
  rm -rf "$ROOT"
  mv "$work" "$ROOT"
  chroot "$ROOT" dpkg-query -W -f '${Version}' rabbitmq-server >"$READY"
  rm -f "$work.log"
  log "ready in $((SECONDS - began)) s: rabbitmq-server $(cat "$READY")"
}

mkdir -p "$(dirname "$ROOT")"
# One build at a time on this machine; the others wait for it and reuse it.
exec 9>"$ROOT.lock"
flock 9
[ -s "$READY" ] || build
flock -u 9

case "${1:-}" in
  --version) cat "$READY"; echo ;;
  *) echo "$ROOT" ;;
esac
