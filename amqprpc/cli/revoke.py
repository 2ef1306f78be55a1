"""``amqprpc revoke SERVICE MESSAGE_ID...``: call off messages by id, for every worker of the
service (:mod:`amqprpc.middleware.revoke`). Needs Redis only, not the broker.

Its own module (registered by :mod:`amqprpc.cli`), importing nothing of ``amqprpc.cli`` so
that the two do not import each other.
"""
from __future__ import annotations

import sys

import click

from amqprpc.config import DEFAULT_REDIS_URL, redact

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 4


@click.command()
@click.argument("service")
@click.argument("message_ids", metavar="MESSAGE_ID...", nargs=-1, required=True)
@click.option("--revoke-ttl", envvar="AMQPRPC_REVOKE_TTL", default=86400.0, show_default=True, show_envvar=True,
              type=click.FloatRange(min=0.001), metavar="SECONDS",
              help="How long the revocation is kept: a message that reaches a worker later runs.")
@click.option("--redis", "redis_url", envvar="AMQPRPC_REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True,
              show_envvar=True, help="Redis URL.")
def revoke(service: str, message_ids: tuple[str, ...], revoke_ttl: float, redis_url: str) -> None:
    """Revoke MESSAGE_IDs of SERVICE (what cast/submit returned) on every worker.

    \b
    Not started yet (queued, or waiting on a countdown or retry delay): acked unrun,
    counted as revoked; a call is answered with a Revoked error.
    Running: the handler's current_call().cancelled turns true within ~1 s.
    Exit 0 once stored, 4 when Redis cannot be reached (nothing was revoked).
    """
    from amqprpc.errors import ServiceUnavailable
    from amqprpc.middleware.revoke import RevocationStore

    try:
        count = RevocationStore(redis_url).revoke(service, message_ids, revoke_ttl)
    except ServiceUnavailable as exc:
        click.echo(f"Error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    click.echo(f"revoked {count} message{'s' if count != 1 else ''} of {service} for {revoke_ttl:g}s")
