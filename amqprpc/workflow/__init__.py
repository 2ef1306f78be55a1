"""Workflows: :func:`task`, :func:`chain`, :func:`group`, :func:`chord`, run with
``client.run(workflow)`` (:class:`WorkflowHandle`). See :mod:`.canvas` for the result rule
and :mod:`.runner` for the guarantees."""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Dict, Optional

from amqprpc.wire import envelope
from amqprpc.workflow.canvas import Chain, Group, Node, Task, chain, chord, group, task, tasks_of, to_json
from amqprpc.workflow.handle import AsyncWorkflowHandle, WorkflowHandle
from amqprpc.workflow.runner import plan, publish
from amqprpc.workflow.state import DEFAULT_PREFIX, DEFAULT_TTL, WorkflowState

__all__ = ["task", "chain", "group", "chord", "Task", "Chain", "Group", "Node", "WorkflowHandle",
           "AsyncWorkflowHandle", "WorkflowState", "start", "default_state"]

_states: Dict[str, WorkflowState] = {}
_states_lock = threading.Lock()


def default_state(redis_url: Optional[str] = None) -> WorkflowState:
    """The process's WorkflowState for ``redis_url`` (default ``AMQPRPC_REDIS_URL``): key
    prefix ``AMQPRPC_WORKFLOW_PREFIX`` (``amqprpc:workflow:``), kept ``AMQPRPC_WORKFLOW_TTL``
    seconds (86400) after a workflow's last step."""
    from amqprpc.config import redis_client, redis_url as configured

    url = configured(redis_url)
    with _states_lock:
        state = _states.get(url)
        if state is None:
            state = _states[url] = WorkflowState(
                redis_client(url, timeout=5.0), prefix=os.environ.get("AMQPRPC_WORKFLOW_PREFIX", DEFAULT_PREFIX),
                ttl=int(os.environ.get("AMQPRPC_WORKFLOW_TTL", DEFAULT_TTL)))
        return state


def start(client: Any, workflow: Node, state: Optional[WorkflowState] = None) -> WorkflowHandle:
    """Record ``workflow`` (every step queued) and cast its first steps through ``client``
    (confirmed); returns at once with its handle."""
    state = state or default_state()
    workflow_id = envelope.new_id()
    node = to_json(workflow)
    state.begin(workflow_id, tasks_of(node))
    publish(client, plan(state, workflow_id, node, None, []))
    metrics = sys.modules.get("amqprpc.middleware.metrics")  # counted where Prometheus metrics are on
    if metrics is not None:
        metrics.workflow("started")
    return WorkflowHandle(workflow_id, state)
