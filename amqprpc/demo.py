"""``amqprpc demo``: the seed article's scenario, end to end against a real broker."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import click

from .client import RpcClient
from .errors import RemoteError
from .worker import Worker


def _show(label: str, value) -> None:
    click.echo(f"  {label:<38} -> {value}")


def run_demo(broker_url: str) -> None:
    from workers.user_service import service as user_service

    click.echo(f"Starting user-service worker in-process...")
    worker = Worker(user_service, broker_url=broker_url, concurrency=4)
    worker.start()
    try:
        with RpcClient("demo", broker_url=broker_url, timeout=5.0) as client:
            users = client.proxy("user-service")
            click.echo("order-service calls user-service over RabbitMQ:")
            _show("users.get_user(user_id='user_001')", users.get_user(user_id="user_001"))
            _show("users.getUser(user_id='user_002')", users.getUser(user_id="user_002"))
            _show("validate_token(token='a-long-valid-token')",
                  client.call("user-service", "validate_token", {"token": "a-long-valid-token"}))
            try:
                client.call("user-service", "validate_token", {"token": "short"})
            except RemoteError as exc:
                _show("validate_token(token='short')", f"RemoteError {exc.error_type}: {exc.message}")
            done = threading.Event()
            seen: list = []

            def on_done(future: Future) -> None:
                seen.append(future.result())
                done.set()

            client.call_async("user-service", "get_user", {"user_id": "user_003"}, callback=on_done)
            done.wait(5.0)
            _show("call_async(get_user user_003) callback", seen[0] if seen else "no answer")
    finally:
        worker.shutdown(5.0)
    click.echo("Demo finished: every call answered, worker stopped cleanly.")
