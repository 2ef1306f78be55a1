"""``amqprpc workflow show ID``: a workflow's state and each step's, from Redis."""
from __future__ import annotations

import json

import click

from amqprpc.config import DEFAULT_REDIS_URL

EXIT_UNKNOWN = 1


@click.group()
def workflow() -> None:
    """Workflows (chain, group, chord) started with client.run()."""


@workflow.command()
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@click.option("--redis", "redis_url", envvar="AMQPRPC_REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True,
              show_envvar=True, help="Redis URL.")
def show(workflow_id: str, as_json: bool, redis_url: str) -> None:
    """Print WORKFLOW_ID's state and its steps' (exit 1 when it is unknown or expired)."""
    from amqprpc.workflow import WorkflowHandle, default_state

    status = WorkflowHandle(workflow_id, default_state(redis_url)).status()
    if status["state"] == "unknown":
        click.echo(f"workflow {workflow_id} is unknown (never started, or expired)", err=True)
        raise SystemExit(EXIT_UNKNOWN)
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    click.echo(f"workflow {workflow_id}: {status['state']}")
    if "failed_step" in status:
        click.echo(f"  failed at {status['failed_step']}: {status.get('error_type')}: {status.get('error')}")
    for step, record in status["steps"].items():
        outcome = record.get("error") if "error" in record else json.dumps(record.get("result"))[:60] \
            if "result" in record else ""
        click.echo(f"  {step:<10} {record['service']}.{record['action']:<24} {record['state']:<10} {outcome}")
