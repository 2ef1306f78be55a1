#!/usr/bin/env bash
# Make sure RabbitMQ and Redis answer on 127.0.0.1: start them when installed but not
# running; fail with a clear message when they are missing. Used by `make demo/test`.
set -u
want="${*:-rabbitmq redis}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port seconds name
  for _ in $(seq 1 "$2"); do port_open "$1" && return 0; sleep 1; done
  echo "error: $3 did not start listening on 127.0.0.1:$1 within $2 s" >&2; return 1
}

ensure() {  # name port seconds-to-wait command [args...]: start it if installed and not listening
  local name=$1 port=$2 wait=$3 command=$4
  shift 3
  if port_open "$port"; then return 0; fi
  if ! command -v "$command" >/dev/null; then
    echo "error: $name is not running on 127.0.0.1:$port and is not installed (apt-get install $command)" >&2
    return 1
  fi
  echo "starting $name ($*)..." >&2
  "$@" >/dev/null 2>&1 || true
  wait_port "$port" "$wait" "$name"
}

ensure_rabbitmq() {
  ensure RabbitMQ 5672 90 rabbitmq-server -detached || return 1
  rabbitmqctl await_startup >/dev/null 2>&1 || true
}

ensure_redis() {
  ensure Redis 6379 20 redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
}

status=0
for service in $want; do "ensure_$service" || status=1; done
exit $status
