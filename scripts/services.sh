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

ensure_rabbitmq() {
  if port_open 5672; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null; then
    echo "error: RabbitMQ is not running on 127.0.0.1:5672 and is not installed (apt-get install rabbitmq-server)" >&2
    return 1
  fi
  echo "starting RabbitMQ (rabbitmq-server -detached)..." >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 90 RabbitMQ || return 1
  rabbitmqctl await_startup >/dev/null 2>&1 || true
}

ensure_redis() {
  if port_open 6379; then return 0; fi
  if ! command -v redis-server >/dev/null; then
    echo "error: Redis is not running on 127.0.0.1:6379 and is not installed (apt-get install redis-server)" >&2
    return 1
  fi
  echo "starting Redis..." >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || return 1
  wait_port 6379 20 Redis || return 1
}

status=0
for service in $want; do "ensure_$service" || status=1; done
exit $status
