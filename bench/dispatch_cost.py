"""What the worker's decision code costs per message, old flat layout vs the dispatcher (#21, #27).

    .venv/bin/python -m bench.dispatch_cost [--messages 20000] [--callgrind-messages 5000]
                                            [--old-ref 8d72bd5 | --old-tree PATH] [--no-callgrind]

No broker: ready-made request messages (``amqp.Message`` with properties and
delivery_info as a worker receives them from the client: a call with ``reply_to`` and a
deadline, a cast; a ~90-byte JSON payload; an echo handler) go through
``Worker._process`` of a worker that is built but not started -- the screen, decode, route,
run, reply and the stats, everything but the socket. At the old ref that is the flat
``_process`` of amqprpc/worker.py; now it is ``dispatcher.dispatch`` plus the same stats.

Each variant runs in a subprocess of its own with that tree first on sys.path, twice:
under ``valgrind --tool=callgrind`` for **instructions per message** (the figure to
compare: the same binary and input give the same count whatever else loads the machine;
a marker syscall before and after each phase splits the counts, so start-up and warm-up
are not in them), and natively for **CPU µs per message** (``time.process_time``; the
median of ``--rounds`` interleaved rounds, still moved by a busy machine's caches).

Variants: ``old`` (the worker as built at the old ref), ``new`` (as built now: Ping,
SharedClient and the consume scopes every worker has: Eta, RevokeChecks, Idempotency,
Workflows), ``new without middleware`` (no middleware at all), ``new without Workflows``
(Workflows taken out of the worker's hooks), ``new without feature scopes`` (Eta,
RevokeChecks, Idempotency and Workflows taken out) and ``new + no-op scopes`` (one more middleware whose
consume_scope and handle_scope only call on). RevokeChecks is measured between its Redis
polls (its "this service has revocations" flag cached, none; its poller thread asleep):
a round trip and a poller wake-up per ``flag_cache`` / ``poll_interval`` seconds are not
per-message work, and under valgrind they made the count depend on the run's speed.

``--out PATH`` writes the figures as JSON, with the date, the load and a ``features`` summary:
what the feature scopes a service does not use cost per message (``new`` against ``new without
feature scopes``, and against ``old``); ``python -m bench --dispatch-cost PATH`` and
``python -m bench.report --dispatch-cost PATH`` print it in the bench's table (bench/report.py).
``--features`` runs only the three variants that summary needs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve()
NEW_TREE = HERE.parent.parent
OLD_REF = "8d72bd5"  # the last commit before the dispatcher (#21): the flat layout
KINDS = ("call", "cast")
VARIANTS = {  # label: (tree, how the worker is set up)
    "old": ("old", "as built"),
    "new": ("new", "as built"),
    "new without middleware": ("new", "no middleware"),
    "new without Workflows": ("new", "no workflows"),
    "new without feature scopes": ("new", "no feature scopes"),
    "new + no-op scopes": ("new", "noop scopes"),
}
PAYLOAD = {"user_id": "u-123", "fields": ["name", "email", "created_at"], "n": 42, "note": "bench dispatch"}
MARKER = "getppid"  # the syscall that splits callgrind's counts into phases (os.getppid)
WARMUP = 500
FEATURE_VARIANTS = ("old", "new", "new without feature scopes")  # what the features summary compares
GOAL = 1.05  # #27: the features a service does not use cost <= 5% worker CPU per call


# --- the child: one variant, in a process of its own -----------------------------------
def child(setup: str, messages: int) -> dict[str, Any]:
    """Run ``messages`` calls, then as many casts, through the worker's decision code;
    os.getppid() before each phase and after the last is callgrind's cut."""
    from amqprpc import Service, logs

    try:
        from amqprpc.server.worker import Worker
        from amqprpc.wire import envelope
    except ImportError:  # the old flat layout
        from amqprpc import envelope  # type: ignore[attr-defined, no-redef]
        from amqprpc.worker import Worker  # type: ignore[import-not-found, no-redef]
    logs.configure("console", "warning")  # as the bench's worker process
    service = Service("bench-dispatch")
    service.handler("echo")(lambda payload: payload)
    worker = Worker(service, broker_url="amqp://guest:guest@127.0.0.1:5672//")  # built, never started
    _set_up(worker, setup)
    process: Callable[[Any], Any] = worker._process
    batches = {kind: [_message(worker, envelope, kind, i) for i in range(messages)] for kind in KINDS}
    for kind in KINDS:  # warm up, and check that each kind gets its proper decision
        for message in [_message(worker, envelope, kind, i) for i in range(WARMUP)]:
            decision = process(message)
        want = "replied" if kind == "call" else "done"
        assert decision.outcome.kind.value == want and decision.forward is None, (kind, decision)
    cpu = {}
    for kind in KINDS:
        batch = batches[kind]
        os.getppid()
        started = time.process_time()
        for message in batch:
            process(message)
        cpu[kind] = (time.process_time() - started) / messages * 1e6
    os.getppid()
    return {"amqprpc": str(Path(sys.modules["amqprpc"].__file__ or "").parent),
            "stats": worker.stats, "cpu_us": cpu}


def _set_up(worker: Any, setup: str) -> None:
    """Change the worker's middleware for the variant, and rebuild its dispatcher as
    ``Worker.start`` does."""
    for middleware in worker.hooks.middleware:  # RevokeChecks: between its polls, no revocations
        if hasattr(middleware, "flag_cache") and hasattr(middleware, "_flags"):
            middleware.flag_cache = float("inf")
            middleware._flags[worker.service.name] = (False, time.monotonic())
        if hasattr(middleware, "poll_interval"):
            middleware.poll_interval = 1e6  # its poller thread, woken by the first delivery, then waits
    if setup == "as built":
        return
    from amqprpc.middleware import Hooks, Middleware

    if setup == "no middleware":
        worker.hooks = Hooks(defaults=False)
    elif setup in ("no workflows", "no feature scopes"):
        features = ("Workflows",) if setup == "no workflows" else ("Workflows", "RevokeChecks", "Idempotency", "Eta")
        worker.hooks.middleware[:] = [m for m in worker.hooks.middleware if type(m).__name__ not in features]
        worker.hooks._resolve()
    elif setup == "noop scopes":
        class NoopScopes(Middleware):
            def consume_scope(self, call_next: Callable[[Any], Any], delivery: Any) -> Any:
                return call_next(delivery)

            def handle_scope(self, call_next: Callable[[Any], Any], delivery: Any) -> Any:
                return call_next(delivery)

        worker.hooks.add(NoopScopes())
    else:
        raise ValueError(setup)
    worker.dispatcher = worker._dispatcher()


def _message(worker: Any, envelope: Any, kind: str, index: int) -> Any:
    """A request as the worker receives it from RpcClient.call / .cast (deterministic ids),
    its body made by that tree's ``envelope`` module."""
    import amqp

    message_id = f"{index:032x}"
    call = kind == "call"
    reply_to = "amq.gen-0123456789abcdefghijkl" if call else None
    headers: dict[str, Any] = {"trace_id": f"{index:032x}"}
    if call:
        headers["deadline"] = round(time.time() + 3600, 6)
    body = envelope.request_body(message_id=message_id, source="bench", target=worker.service.name, action="echo",
                                 payload=PAYLOAD, reply_to=reply_to, headers=headers)
    properties: dict[str, Any] = {"content_type": envelope.CONTENT_TYPE, "message_id": message_id, "delivery_mode": 2}
    if call:
        properties.update(correlation_id=message_id, reply_to=reply_to, expiration="10000")
    message = amqp.Message(body, **properties)
    message.delivery_info = {"consumer_tag": worker.consumer_tag, "delivery_tag": index + 1, "redelivered": False,
                             "exchange": "service.exchange", "routing_key": f"request.{worker.service.name}"}
    return message


# --- the parent: runs every variant, prints the table ----------------------------------
def run_child(tree: Path, setup: str, messages: int, callgrind_out: Path | None = None) -> dict[str, Any]:
    """One variant's figures: CPU µs per message, and (under callgrind) instructions per
    message from the phase dumps."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    command = [sys.executable, str(HERE), "--child", setup, "--messages", str(messages)]
    if callgrind_out is not None:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind_out}",
                   f"--dump-before={MARKER}", *command]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(f"{setup} in {tree} failed:\n{run.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    if not figures["amqprpc"].startswith(str(tree)):
        raise SystemExit(f"the child imported {figures['amqprpc']}, not the tree {tree}")
    if callgrind_out is not None:
        # dump .1: start-up and warm-up; .2: the calls; .3: the casts; the last: exit.
        parts = [_instructions(Path(f"{callgrind_out}.{n}")) for n in range(1, len(KINDS) + 2)]
        if Path(f"{callgrind_out}.{len(KINDS) + 2}").exists():
            raise SystemExit(f"{MARKER} was called outside the markers: the phases cannot be told apart")
        figures["instructions"] = {kind: parts[n + 1] / messages for n, kind in enumerate(KINDS)}
    return figures


def _instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dump}")


def trees(scratch: Path, old_ref: str, old_checkout: Path | None, new_ref: str | None) -> dict[str, Path]:
    """Copies of the two amqprpc packages at paths of the same length (scratch/old,
    scratch/new): the length of a path moves where objects land in memory, and with it
    the instruction count by up to ~1% (id-keyed hashing: contextvars), so the two sides
    must not differ in it. The old one from git at ``old_ref`` (no worktree left behind)
    or from ``old_checkout``; the new one is this checkout, uncommitted edits included (or
    ``new_ref`` from git)."""
    old, new = scratch / "old", scratch / "new"
    if old_checkout is not None:
        shutil.copytree(old_checkout / "amqprpc", old / "amqprpc", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        _extract(old_ref, old)
    if new_ref is not None:
        _extract(new_ref, new)
    else:
        shutil.copytree(NEW_TREE / "amqprpc", new / "amqprpc", ignore=shutil.ignore_patterns("__pycache__"))
    return {"old": old, "new": new}


def _extract(ref: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(NEW_TREE), "archive", ref, "amqprpc"], capture_output=True, check=True)
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def measure(trees: dict[str, Path], labels: list[str], messages: int, callgrind_messages: int, rounds: int,
            callgrind: bool, scratch: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {"instructions" | "cpu_us": {kind: per message}}}."""
    results: dict[str, dict[str, dict[str, float]]] = {label: {} for label in labels}
    cpu: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for _ in range(rounds):  # interleaved, so that a busy spell skews every variant alike
        for label in labels:
            tree, setup = VARIANTS[label]
            cpu[label].append(run_child(trees[tree], setup, messages)["cpu_us"])
    for label in labels:
        tree, setup = VARIANTS[label]
        results[label]["cpu_us"] = {kind: statistics.median(r[kind] for r in cpu[label]) for kind in KINDS}
        if callgrind:
            out = scratch / f"callgrind.{tree}.{setup.replace(' ', '-')}"
            results[label]["instructions"] = run_child(trees[tree], setup, callgrind_messages, out)["instructions"]
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> Iterator[str]:
    """A markdown table: per message, each variant against ``old``."""
    old = results["old"]
    yield "| variant | kind | instructions/msg | vs old | CPU µs/msg | vs old |"
    yield "|---|---|---:|---:|---:|---:|"
    for label, figures in results.items():
        for kind in KINDS:
            row = [label, kind]
            for key, fmt in (("instructions", "{:,.0f}"), ("cpu_us", "{:.1f}")):
                value = figures.get(key, {}).get(kind)
                row += ["-", "-"] if value is None else [fmt.format(value), f"{value / old[key][kind]:.3f}"]
            yield "| " + " | ".join(row) + " |"


def summary(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """What the feature scopes cost a message that uses none of them, per kind: ``new`` (as
    every worker is built) over ``new without feature scopes`` and over ``old``; instructions
    when counted, else CPU time (said in ``measure``)."""
    if not all(label in results for label in FEATURE_VARIANTS):
        return {}
    measure = "instructions" if "instructions" in results["new"] else "cpu_us"
    kinds = {}
    for kind in KINDS:
        old, built, without = (results[label][measure][kind] for label in FEATURE_VARIANTS)
        kinds[kind] = {"as_built": built, "without_features": without, "old": old,
                       "vs_without": round(built / without, 4), "vs_old": round(built / old, 4)}
    return {"measure": measure, "goal": GOAL, "kinds": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per kind, for the CPU time")
    parser.add_argument("--callgrind-messages", type=int, default=5_000, help="per kind, under callgrind")
    parser.add_argument("--rounds", type=int, default=3, help="native runs per variant (the median is shown)")
    parser.add_argument("--old-ref", default=OLD_REF, help="the git ref of the old layout")
    parser.add_argument("--old-tree", type=Path, help="a checkout of the old layout (instead of --old-ref)")
    parser.add_argument("--new-ref", help="measure this git ref as the new side (default: this checkout)")
    parser.add_argument("--no-callgrind", action="store_true", help="CPU time only (fast; no valgrind)")
    parser.add_argument("--only", help="these variants, comma-separated (old is always run: the reference)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON (with the date, load and summary)")
    parser.add_argument("--features", action="store_true",
                        help=f"only the variants the features summary needs: {', '.join(FEATURE_VARIANTS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.messages)))
        return
    callgrind = not args.no_callgrind
    labels = ["old", *(label for label in args.only.split(",") if label != "old")] if args.only else list(VARIANTS)
    if args.features:
        labels = list(FEATURE_VARIANTS)
    unknown = set(labels) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant {sorted(unknown)[0]!r} (one of: {', '.join(VARIANTS)})")
    if callgrind and shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind), or run with --no-callgrind")
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dispatch-cost-") as scratch:
        results = measure(trees(Path(scratch), args.old_ref, args.old_tree, args.new_ref), labels, args.messages,
                          args.callgrind_messages, args.rounds, callgrind, Path(scratch))
    print(f"Worker decision code per message, no broker ({args.messages} per kind for CPU time, median of "
          f"{args.rounds} rounds" + (f"; {args.callgrind_messages} per kind under callgrind)" if callgrind else ")"))
    print()
    print("\n".join(table(results)))
    features = summary(results)
    if features:
        print()
        for kind, figures in features["kinds"].items():
            print(f"features unused, {kind}: {figures['as_built']:,.0f} {features['measure']}/msg as built, "
                  f"{figures['vs_without']:.3f}x without the feature scopes, {figures['vs_old']:.3f}x old")
    if args.out:
        doc = {"tool": "dispatch_cost", "started_utc": datetime.datetime.fromtimestamp(
                   started, datetime.timezone.utc).isoformat(timespec="seconds"),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "nproc": os.cpu_count(),
               "settings": {"old_ref": str(args.old_tree or args.old_ref), "new_ref": args.new_ref or "checkout",
                            "messages": args.messages, "callgrind_messages": args.callgrind_messages if callgrind
                            else None, "rounds": args.rounds},
               "results": results, "features": features}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:
        del sys.path[0]  # run as a file (the child): bench/ must not shadow the stdlib (profile.py)
    main()
