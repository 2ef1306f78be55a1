"""What follows a workflow step, run by the worker that ran the step (every worker has it).

A delivery without a ``workflow`` envelope header does not enter this scope (``consume_gate``).
For a step (:mod:`amqprpc.workflow.runner`): claim it (a second copy is acked unrun,
``skipped``), run it, and then -- it succeeded -- record its result and cast what follows,
or -- it failed for good -- fail the workflow. With Redis unreachable, the step waits in a
delay queue (5 s) and comes back: nothing runs without its state, nothing is lost.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from amqprpc import logs
from amqprpc.middleware import Delivery, Middleware
from amqprpc.outcome import OutcomeKind
from amqprpc.retry import ERROR, ERROR_TYPE

log = logs.get_logger("amqprpc.workflow")

REDIS_DOWN_RETRY_S = 5.0
PUBLISH_FAILED_RETRY_S = 1.0


class Workflows(Middleware):
    """Runs a workflow's step and what follows it (see the module doc); the chain skips it
    for a message without a ``workflow`` header."""

    consume_gate = (("body_headers", "workflow"),)

    def __init__(self, state: Any = None) -> None:
        self._state = state

    def state(self) -> Any:
        if self._state is None:
            from amqprpc.workflow import default_state

            self._state = default_state()
        return self._state

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        flow = delivery.body_headers.get("workflow")
        if not flow:
            return call_next(delivery)
        return self._step(call_next, delivery, flow)

    def _step(self, call_next: Callable[[Delivery], Any], delivery: Delivery, flow: Any) -> Any:
        from amqprpc.workflow.runner import advance, publish

        decide = delivery.decide
        try:
            workflow, step, state = str(flow["id"]), flow["step"], self.state()
            verdict = state.claim(workflow, step, str(flow["nonce"]))
        except (KeyError, TypeError) as exc:
            return decide.dead_letter(delivery, f"Bad workflow header: {exc!r}", "BadMessage", OutcomeKind.REFUSED)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: the step waits and comes back
            log.warning("workflow state unreachable; step put off", error=repr(exc)[:300], retry_in=REDIS_DOWN_RETRY_S)
            return decide.later(delivery, REDIS_DOWN_RETRY_S, OutcomeKind.RETRIED)
        if verdict != "run":
            log.info("workflow step acked unrun", workflow=workflow, step=step.get("id"), why=verdict)
            return decide.ack(delivery, OutcomeKind.SKIPPED, verdict)
        decision = call_next(delivery)
        kind = decision.outcome.kind
        if kind in (OutcomeKind.DONE, OutcomeKind.REPLIED):
            try:
                state.succeeded(workflow, step, delivery.result)
                ended: list[bool] = []
                publish(decide.service.client, advance(state, workflow, flow.get("then") or [], delivery.result, ended))
            except (TypeError, ValueError) as exc:  # what it returned cannot travel on: for good
                log.warning("a workflow step's result cannot feed what follows", error=str(exc)[:300])
                self._record_failure(state, workflow, step, f"its result cannot be passed on: {exc}", "WorkflowError")
            except Exception as exc:  # noqa: BLE001 - run it again later: its claim lets this copy in again
                log.warning("what follows a workflow step could not be published; step put off",
                            error=repr(exc)[:300], workflow=workflow, step=step.get("id"))
                return decide.later(delivery, PUBLISH_FAILED_RETRY_S, OutcomeKind.RETRIED)
            if ended:
                _ended(delivery, "succeeded")
        elif kind is OutcomeKind.DEAD_LETTERED:
            self._failed(state, workflow, step, decision)
            _ended(delivery, "failed")
        return decision

    def _failed(self, state: Any, workflow: str, step: Any, decision: Any) -> None:
        forward = decision.forward
        headers: Optional[Any] = forward.message.properties.get("application_headers") if forward else None
        error = str((headers or {}).get(ERROR, "failed"))
        error_type = str((headers or {}).get(ERROR_TYPE, decision.outcome.error_type or "Error"))
        self._record_failure(state, workflow, step, error, error_type)

    def _record_failure(self, state: Any, workflow: str, step: Any, error: str, error_type: str) -> None:
        try:
            state.fail(workflow, step, error, error_type)
        except Exception as exc:  # noqa: BLE001 - the dead letter stays; the caller's result() waits on
            log.error("workflow failure could not be recorded", error=repr(exc)[:300], workflow=workflow)
        log.warning("workflow failed", workflow=workflow, step=step.get("id"), error_type=error_type)


def _ended(delivery: Delivery, outcome: str) -> None:
    """Count a workflow this step ended: in the worker's stats (workflows_succeeded,
    workflows_failed) and, where Prometheus metrics are on, amqprpc_workflows_total."""
    count = getattr(delivery.worker, "count", None)
    if count is not None:
        count(f"workflows_{outcome}")
    metrics = sys.modules.get("amqprpc.middleware.metrics")  # loaded only with --metrics-port
    if metrics is not None:
        metrics.workflow(outcome)
