"""The ``amqprpc`` command. Every option also reads an ``AMQPRPC_*`` environment variable.

Exit codes (``call``, ``cast``, ``publish``): 0 success, 1 remote error, 2 usage,
3 timeout, 4 service or broker unavailable / circuit open.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

import click

from amqprpc import logs
from amqprpc.config import DEFAULT_BROKER_URL, DEFAULT_COLLECTOR_QUEUE, DEFAULT_REDIS_URL, redact
from amqprpc.caller import Caller
from amqprpc.errors import CallTimeout, ContractError, RemoteError, RpcError, ServiceNotFound, ServiceUnavailable
from amqprpc.cli import dashboard as dashboard_commands
from amqprpc.cli import revoke as revoke_command
from amqprpc.cli.taskcontrol import task_control_options
from amqprpc.cli import workflow as workflow_commands

EXIT_OK, EXIT_REMOTE_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4


# --- reusable option groups (Celery-style) -------------------------------------------
def broker_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--broker", envvar="AMQPRPC_BROKER_URL", default=DEFAULT_BROKER_URL,
                        show_default=redact(DEFAULT_BROKER_URL), show_envvar=True,
                        help="Broker URL; several as 'amqp://h1;amqp://h2' fail over. amqps:// for TLS.")(fn)


def logging_options(default_level: str = "info") -> Callable[..., Any]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--log-level", envvar="AMQPRPC_LOG_LEVEL", default=default_level, show_default=True,
                          show_envvar=True, type=click.Choice(logs.LEVELS, case_sensitive=False))(fn)
        fn = click.option("--log-format", envvar="AMQPRPC_LOG_FORMAT", default="console", show_default=True,
                          show_envvar=True, type=click.Choice(["json", "console"]),
                          help="json for log shippers, console for people.")(fn)
        return fn
    return decorate


def redis_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--redis", "redis_url", envvar="AMQPRPC_REDIS_URL", default=DEFAULT_REDIS_URL,
                        show_default=True, show_envvar=True,
                        help="Redis URL: redis://[:password@]HOST:PORT/DB, or through Sentinel "
                             "redis+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB].")(fn)


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of every resident process (worker, collector)."""
    fn = click.option("--heartbeat", envvar="AMQPRPC_HEARTBEAT", default=30.0, show_default=True, show_envvar=True,
                      type=click.FloatRange(min=0), help="AMQP heartbeat in seconds (0 disables).")(fn)
    fn = click.option("--shutdown-timeout", envvar="AMQPRPC_SHUTDOWN_TIMEOUT", default=30.0, show_default=True,
                      show_envvar=True, type=click.FloatRange(min=0),
                      help="Seconds running work gets to finish on SIGTERM.")(fn)
    fn = click.option("--reconnect-cap", envvar="AMQPRPC_RECONNECT_CAP", default=10.0, show_default=True,
                      show_envvar=True, type=click.FloatRange(min=0.1),
                      help="Longest wait in seconds between broker reconnect attempts (full-jitter backoff).")(fn)
    fn = click.option("--pidfile", envvar="AMQPRPC_PIDFILE", default=None, show_envvar=True,
                      type=click.Path(dir_okay=False),
                      help="Write the pid here; refuse to start if it names a live process.")(fn)
    fn = click.option("--broker-wait", envvar="AMQPRPC_BROKER_WAIT", default=math.inf, show_default="forever",
                      show_envvar=True, type=click.FloatRange(min=0), metavar="SECONDS",
                      help="How long an unreachable broker is retried at start (backoff up to --reconnect-cap, "
                           "each attempt logged) before exit 4. 0: exit 4 at once (scripts).")(fn)
    return fn


def timeout_option(what: str = "Seconds to wait for the answer.") -> Callable[..., Any]:
    return click.option("--timeout", envvar="AMQPRPC_TIMEOUT", default=5.0, show_default=True, show_envvar=True,
                        type=click.FloatRange(min=0.001), help=what)


CONFIRM_TIMEOUT_HELP = "Seconds to wait for the broker to confirm it stored the message."


class JsonObject(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on; we support 8.0
    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            doc = json.loads(value)
        except ValueError as exc:
            self.fail(f"not valid JSON: {exc}", param, ctx)
        if not isinstance(doc, dict):
            self.fail("must be a JSON object, e.g. '{\"user_id\": \"user_001\"}'", param, ctx)
        return doc


def fail(code: int, message: str) -> None:
    click.echo(f"Error: {redact(message)}", err=True)
    sys.exit(code)


def request_arguments(timeout_help: str) -> Callable[..., Any]:
    """SERVICE ACTION [PAYLOAD] with the timeout, broker and logging options (call, cast)."""
    def decorate_all(fn: Callable[..., Any]) -> Callable[..., Any]:
        decorators: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
            click.argument("service"), click.argument("action"),
            click.argument("payload", required=False, default="{}", type=JsonObject()),
            timeout_option(timeout_help), broker_option, logging_options("warning"),
        ]
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn
    return decorate_all


def with_client(broker: str, timeout: float, use: Callable[[Any], Any]) -> Any:
    """Run ``use(client)`` with a short-lived client; an RpcError exits with its code."""
    from amqprpc.client.rpc import RpcClient

    try:
        with RpcClient("amqprpc-cli", broker_url=broker, timeout=timeout) as client:
            return use(client)
    except RpcError as exc:
        fail(exit_code_for(exc), str(exc))


def exit_code_for(exc: RpcError) -> int:
    if isinstance(exc, RemoteError):
        return EXIT_REMOTE_ERROR
    if isinstance(exc, CallTimeout):
        return EXIT_TIMEOUT
    return EXIT_UNAVAILABLE


# --- commands ------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="amqprpc")
def main() -> None:
    """amqprpc: calls and events between microservices over RabbitMQ."""


@main.command()
@click.argument("service")
@click.option("--app", envvar="AMQPRPC_APP", show_envvar=True, metavar="MODULE:ATTR",
              help="Load the Service from here (imported from the current folder first) instead of the entry "
                   "points / workers package; it must be the service named SERVICE.")
@click.option("--concurrency", "-c", envvar="AMQPRPC_CONCURRENCY", default=8, show_default=True, show_envvar=True,
              type=click.IntRange(min=1), help="Handler threads.")
@click.option("--prefetch", envvar="AMQPRPC_PREFETCH", default=None, show_envvar=True, type=click.IntRange(min=1),
              help="Unacked messages held at most  [default: 2 x concurrency]")
@click.option("--metrics-port", envvar="AMQPRPC_METRICS_PORT", default=None, show_envvar=True,
              type=click.IntRange(min=1, max=65535), help="Serve Prometheus metrics on this port at /metrics.")
@click.option("--registry-interval", envvar="AMQPRPC_REGISTRY_INTERVAL", default=5.0, show_default=True,
              show_envvar=True, type=click.FloatRange(min=0),
              help="Seconds between heartbeats to the service registry in Redis (0: do not register).")
@redis_option
@daemon_options
@click.option("--max-message-bytes", envvar="AMQPRPC_MAX_MESSAGE_BYTES", default=1 << 20, show_default=True,
              show_envvar=True, type=click.IntRange(min=1), help="Larger requests are refused unparsed.")
@click.option("--queue-type", envvar="AMQPRPC_QUEUE_TYPE", default="classic", show_default=True, show_envvar=True,
              type=click.Choice(["classic", "quorum"]), help="quorum for clustered brokers (with a delivery limit).")
@click.option("--max-redeliveries", envvar="AMQPRPC_MAX_REDELIVERIES", default=5, show_default=True,
              show_envvar=True, type=click.IntRange(min=0),
              help="A message redelivered more often than this (its handler keeps killing the worker) is "
                   "dead-lettered unrun.")
@task_control_options
@broker_option
@logging_options("info")
def worker(service: str, app: str | None, concurrency: int, prefetch: int | None, shutdown_timeout: float,
           heartbeat: float, registry_interval: float, redis_url: str, max_message_bytes: int, queue_type: str,
           max_redeliveries: int, pidfile: str | None, metrics_port: int | None, reconnect_cap: float,
           broker_wait: float, broker: str, log_format: str, log_level: str, **control: Any) -> None:
    """Run SERVICE's handlers in the foreground until a stop signal.

    \b
    SIGTERM, SIGINT      warm stop: running handlers finish (--shutdown-timeout),
                         prefetched messages are requeued, exit 0
    2nd signal, SIGQUIT  cold stop at once: everything unacked is requeued, exit 1
    SIGHUP               ignored (restart = SIGTERM, the supervisor starts a new one)

    SERVICE resolves through the 'amqprpc.services' entry points, then the module
    workers.<service with - as _>; --app (imported from the current folder first, like
    celery -A) overrides both and must load the service named SERVICE. A broker that is
    down at start is waited for (--broker-wait); a lost connection is retried forever with
    capped, jittered backoff. Exit 0 after a clean warm stop, 1 after a cold stop, 2 for
    usage errors, 4 when the broker stayed unreachable for --broker-wait.

    \b
    --processes N: a parent and N child workers; it restarts one that dies, recycles
    one after --max-tasks-per-child / above --max-memory-per-child, forwards the stop
    signals and exits as above (docs/guides/processes-and-time-limits.md).
    """
    from amqprpc.ops.daemon import run_worker
    from amqprpc.errors import ServiceNotFound, StartupError, TopologyMismatch
    from amqprpc.ops.loading import load_service
    from amqprpc.server.worker import Worker

    logs.configure(log_format, log_level)
    try:
        svc = load_service(service, app)
    except ServiceNotFound as exc:
        fail(EXIT_USAGE, str(exc))
    logs.bind_process(service=svc.name)
    from amqprpc.ops.registry import Registry

    try:
        svc.check()  # a handler annotation that cannot be validated: exit 2 now, not on the first call
    except ContractError as exc:
        fail(EXIT_USAGE, str(exc))
    from amqprpc.ops import taskcontrol

    def serve(child: Any = None) -> int:
        """This process as one worker (``child``: a --processes child's link to its parent)."""
        registry = Registry(redis_url) if registry_interval > 0 else None
        instance = Worker(svc, broker_url=broker, concurrency=concurrency, prefetch=prefetch, heartbeat=heartbeat,
                          registry=registry, registry_interval=registry_interval or 5.0,
                          max_message_bytes=max_message_bytes, queue_type=queue_type,
                          max_redeliveries=max_redeliveries, reconnect_cap=reconnect_cap, redis_url=redis_url,
                          middleware=taskcontrol.worker_middleware(svc, control, child))
        try:
            return run_worker(instance, shutdown_timeout, pidfile=None if child else pidfile,
                              metrics_port=taskcontrol.metrics_port_of(metrics_port, child),
                              broker_wait=broker_wait, title=taskcontrol.title_of(svc.name, child))
        except (StartupError, TopologyMismatch) as exc:
            fail(EXIT_USAGE, str(exc))
        except Exception as exc:  # noqa: BLE001 - connection failures at start: one line, no traceback
            fail(EXIT_UNAVAILABLE, f"cannot connect to broker {broker}: {exc}")
        return EXIT_UNAVAILABLE  # (fail exits)

    if control["processes"]:
        try:
            sys.exit(taskcontrol.run_processes(serve, svc.name, control, shutdown_timeout, pidfile))
        except StartupError as exc:
            fail(EXIT_USAGE, str(exc))
    elif control["max_tasks_per_child"] or control["max_memory_per_child"]:
        fail(EXIT_USAGE, "--max-tasks-per-child and --max-memory-per-child need --processes")
    sys.exit(serve())


@main.command()
@request_arguments("Seconds to wait for the answer.")
def call(service: str, action: str, payload: dict[str, Any], timeout: float, broker: str, log_format: str,
         log_level: str) -> None:
    """Call ACTION on SERVICE with PAYLOAD (a JSON object) and print the data as JSON.

    Exit 0 success, 1 remote error, 2 usage, 3 timeout, 4 unavailable.
    """
    logs.configure(log_format, log_level)
    data = with_client(broker, timeout, lambda client: client.call(service, action, payload, timeout=timeout))
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@main.command()
@request_arguments(CONFIRM_TIMEOUT_HELP)
@click.option("--countdown", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Run it this many seconds from now (it waits in the broker; up to 30 days).")
@click.option("--priority", default=None, type=click.IntRange(min=0, max=255),
              help="Message priority (honoured by a service declared with max_priority).")
def cast(service: str, action: str, payload: dict[str, Any], timeout: float, broker: str, log_format: str,
         log_level: str, countdown: float | None, priority: int | None) -> None:
    """Send ACTION to SERVICE without waiting for a reply (persistent, broker-confirmed).
    Prints 'sent' (and, with --countdown, the message id)."""
    logs.configure(log_format, log_level)
    message_id = with_client(broker, timeout, lambda client: client.cast(
        service, action, payload, timeout=timeout, countdown=countdown, priority=priority))
    click.echo("sent" if countdown is None else f"sent {message_id}")


@main.command()
@click.argument("event")
@click.argument("payload", required=False, default="{}", type=JsonObject())
@timeout_option(CONFIRM_TIMEOUT_HELP)
@broker_option
@logging_options("warning")
def publish(event: str, payload: dict[str, Any], timeout: float, broker: str, log_format: str, log_level: str) -> None:
    """Publish EVENT (e.g. order.created) with PAYLOAD (persistent, broker-confirmed)."""
    logs.configure(log_format, log_level)
    with_client(broker, timeout, lambda client: client.publish_event(event, payload, timeout=timeout))
    click.echo("published")


@main.command()
@click.argument("service")
@click.option("--limit", "-n", envvar="AMQPRPC_DLQ_LIMIT", default=10, show_default=True, show_envvar=True,
              type=click.IntRange(min=0), help="How many dead letters to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--replay", is_flag=True, help="Send every dead letter back to its queue (ids kept, retries reset).")
@click.option("--purge", is_flag=True, help="Delete every dead letter.")
@broker_option
@logging_options("warning")
def dlq(service: str, limit: int, as_json: bool, replay: bool, purge: bool, broker: str, log_format: str,
        log_level: str) -> None:
    """Show SERVICE's dead letters (service.SERVICE.dead): how many, and why the first ones failed.

    Exit 0, 2 for usage errors, 4 when the broker or the queue cannot be reached.
    """
    from amqprpc.ops import dlq as dead
    from amqprpc.wire.topology import DEFAULT_TOPOLOGY

    logs.configure(log_format, log_level)
    if replay and purge:
        raise click.UsageError("--replay and --purge exclude each other")
    try:
        if replay:
            done, kept = dead.replay(service, broker_url=broker)
            result: dict[str, Any] = {"replayed": done, "unroutable": kept}
            text = f"replayed {done} dead letter(s) of {service}" + (f"; {kept} unroutable, kept" if kept else "")
        elif purge:
            result = {"purged": dead.purge(service, broker_url=broker)}
            text = f"purged {result['purged']} dead letter(s) of {service}"
        else:
            count, letters = dead.inspect(service, limit, broker_url=broker)
            result = {"queue": DEFAULT_TOPOLOGY.dead_queue_name(service), "count": count, "messages": letters}
            text = "\n".join([f"{count} dead letter(s) in {result['queue']}"] + [
                f"  {m['message_id']}  {m['action']}  {m['error_type']}: {m['error']}  "
                f"(attempts {m['attempts']}, last {m['last_failure']}, from {m['original_queue']})"
                for m in letters])
    except Exception as exc:  # noqa: BLE001 - connection failures: one line, no traceback
        fail(EXIT_UNAVAILABLE, f"broker {broker}: {exc}")
    click.echo(json.dumps(result, indent=2, ensure_ascii=False, default=str) if as_json else text)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--stale-after", envvar="AMQPRPC_REGISTRY_STALE_AFTER", default=60.0, show_default=True,
              show_envvar=True, type=click.FloatRange(min=0.1),
              help="Seconds without a heartbeat after which an instance counts as dead (and is pruned).")
@redis_option
def services(as_json: bool, stale_after: float, redis_url: str) -> None:
    """List the services of the registry: live instances, heartbeat age, processed counts.

    Exit 0, or 4 when Redis cannot be reached.
    """
    from amqprpc.ops.registry import Registry, format_table

    try:
        found = Registry(redis_url, stale_after=stale_after).snapshot()
    except Exception as exc:  # noqa: BLE001 - redis errors: one line, no traceback
        fail(EXIT_UNAVAILABLE, f"cannot read the service registry at {redis_url}: {exc}")
    click.echo(json.dumps(found, indent=2) if as_json else format_table(found))


@main.command()
@click.argument("service")
@click.option("--count", "-n", default=1, show_default=True, type=click.IntRange(min=1), help="Round trips to make.")
@timeout_option("Seconds to wait for each pong.")
@broker_option
@logging_options("warning")
def ping(service: str, count: int, timeout: float, broker: str, log_format: str, log_level: str) -> None:
    """Round trip(s) to SERVICE's built-in ping action; prints who answered and the latency.

    Exit 0 when every ping was answered, 3 timeout, 4 unavailable.
    """
    import time

    logs.configure(log_format, log_level)

    def pings(client: Caller) -> None:
        for _ in range(count):
            started = time.perf_counter()
            data = client.call(service, "ping", {}, timeout=timeout)
            click.echo(f"pong from {service} {data.get('instance_id')} in "
                       f"{(time.perf_counter() - started) * 1000:.2f} ms")

    with_client(broker, timeout, pings)


@main.command()
@redis_option
@click.option("--ttl", envvar="AMQPRPC_COLLECTOR_TTL", default=300.0, show_default=True, show_envvar=True,
              type=click.FloatRange(min=0.001), help="Seconds a stored reply lives in Redis.")
@click.option("--queue", "queue_name", envvar="AMQPRPC_COLLECTOR_QUEUE", default=DEFAULT_COLLECTOR_QUEUE,
              show_default=True, show_envvar=True, help="The queue submit() names as reply_to.")
@click.option("--key-prefix", envvar="AMQPRPC_RESPONSE_PREFIX", default="response:", show_default=True,
              show_envvar=True, help="Replies are stored under PREFIX{correlation_id}.")
@click.option("--prefetch", envvar="AMQPRPC_COLLECTOR_PREFETCH", default=200, show_default=True, show_envvar=True,
              type=click.IntRange(min=1), help="Unacked replies held at most (also the Redis batch size).")
@daemon_options
@broker_option
@logging_options("info")
def collector(redis_url: str, ttl: float, queue_name: str, key_prefix: str, prefetch: int, shutdown_timeout: float,
              heartbeat: float, reconnect_cap: float, pidfile: str | None, broker_wait: float, broker: str,
              log_format: str, log_level: str) -> None:
    """Store the replies of submitted requests in Redis (for ResponseStore().get) until
    SIGTERM/SIGINT (warm stop) or SIGQUIT (cold stop).

    A reply is acked only once Redis stored it; while Redis is down the collector retries
    with backoff and the replies wait in the queue. A broker that is down at start is
    waited for (--broker-wait). Exit codes as for 'worker'.
    """
    from amqprpc.ops.collector import Collector
    from amqprpc.ops.daemon import run_worker
    from amqprpc.errors import StartupError
    from amqprpc.client.responses import ResponseStore
    from amqprpc.wire.topology import Topology

    logs.configure(log_format, log_level)
    logs.bind_process(service="amqprpc-collector")
    instance = Collector(ResponseStore(redis_url, prefix=key_prefix), broker_url=broker, ttl=ttl,
                         topology=Topology(collector_queue=queue_name), prefetch=prefetch, heartbeat=heartbeat,
                         reconnect_cap=reconnect_cap)
    try:
        code = run_worker(instance, shutdown_timeout, pidfile=pidfile, title="amqprpc collector",
                          broker_wait=broker_wait, kind="collector")
    except StartupError as exc:
        fail(EXIT_USAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - connection failures at start: one line, no traceback
        fail(EXIT_UNAVAILABLE, f"cannot connect to broker {broker}: {exc}")
    sys.exit(code)


@main.command()
@click.argument("service", required=False)
@click.option("--app", envvar="AMQPRPC_APP", show_envvar=True, metavar="MODULE:ATTR",
              help="Load the Service from here instead of the entry points / workers package (as for 'worker').")
@click.option("--format", "fmt", default="json", show_default=True, type=click.Choice(["json", "yaml"]),
              help="yaml needs PyYAML (pip install 'amqprpc[yaml]').")
@click.option("--out", "-o", default=None, type=click.Path(), metavar="PATH",
              help="Write the document here instead of printing it; with --all, a folder for SERVICE.json each.")
@click.option("--all", "all_services", is_flag=True,
              help="Document every service of the 'amqprpc.services' entry points (needs --out FOLDER).")
@broker_option
def asyncapi(service: str | None, app: str | None, fmt: str, out: str | None, all_services: bool,
             broker: str) -> None:
    """Print SERVICE's contract as an AsyncAPI 3.0 document: the broker, the request channel
    and its queue, one operation per action with its payload schema and its reply (success
    and error envelopes), the events it subscribes to, and the wire envelope.

    Payload schemas come from the handlers' annotations (pydantic models, dataclasses,
    TypedDicts; {"type": "object"} for dict handlers). The server is the --broker URL
    without its credentials. Exit 0, or 2 for usage errors (unknown service, a bad
    annotation, --format yaml without PyYAML).
    """
    import os

    from amqprpc import asyncapi as spec
    from amqprpc.errors import ContractError
    from amqprpc.ops.loading import known_services, load_service

    if all_services and (service or app):
        raise click.UsageError("--all documents every service of the entry points: give no SERVICE or --app")
    if all_services and not out:
        raise click.UsageError("--all writes one document per service: give --out FOLDER")
    if not all_services and not service:
        raise click.UsageError("give SERVICE, or --all --out FOLDER")
    if fmt == "yaml":
        try:
            import yaml  # noqa: F401
        except ImportError:
            fail(EXIT_USAGE, "--format yaml needs PyYAML: pip install 'amqprpc[yaml]' (or use the default, json)")
    names: list[str] = known_services() if all_services else [service or ""]
    texts: dict[str, str] = {}
    try:
        for name in names:
            texts[name] = spec.dumps(spec.document(load_service(name, app), broker_url=broker), fmt)
    except (ServiceNotFound, ContractError) as exc:
        fail(EXIT_USAGE, str(exc))
    if all_services and out:
        os.makedirs(out, exist_ok=True)
        for name, text in texts.items():
            with open(os.path.join(out, f"{name}.{fmt}"), "w", encoding="utf-8") as file:
                file.write(text)
        click.echo(f"wrote {len(texts)} document(s) to {out}: {', '.join(sorted(texts))}", err=True)
    elif out:
        with open(out, "w", encoding="utf-8") as file:
            file.write(texts[names[0]])
    else:
        click.echo(texts[names[0]], nl=False)


@main.command()
@broker_option
@logging_options("error")
def demo(broker: str, log_format: str, log_level: str) -> None:
    """Run the shop's scenario end to end against the broker (starts the workers in-process)."""
    from amqprpc.ops.demo import DemoUnavailable, run_demo

    logs.configure(log_format, log_level)
    try:
        run_demo(broker)
    except DemoUnavailable as exc:
        fail(EXIT_UNAVAILABLE, str(exc))
    except ServiceUnavailable as exc:
        fail(EXIT_UNAVAILABLE, f"{exc}\n  No broker answers. Start one with 'rabbitmq-server -detached' "
             f"(or set AMQPRPC_BROKER_URL), then run 'amqprpc demo' again.")


main.add_command(workflow_commands.workflow)
main.add_command(dashboard_commands.dashboard)
main.add_command(revoke_command.revoke)

from amqprpc.cli import beat as _beat  # noqa: E402 - the commands of tasks in time (#22), after main exists

_beat.register(main, sys.modules[__name__])

if __name__ == "__main__":  # pragma: no cover
    main()
