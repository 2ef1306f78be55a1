"""What ``client.run(workflow)`` returns: the workflow's id, its steps' states, its result."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, Optional

from amqprpc.errors import CallTimeout, WorkflowFailed
from amqprpc.workflow.state import FAILED, REVOKED, SUCCEEDED, WorkflowState


class WorkflowHandle:
    """``handle.id``; ``handle.status()``; ``handle.result(timeout=S)``. Made from an id alone
    too (``WorkflowHandle(id, state)``), by whoever polls later (a web tier answering 202)."""

    def __init__(self, workflow_id: str, state: WorkflowState) -> None:
        self.id = workflow_id
        self.state = state

    def status(self) -> Dict[str, Any]:
        """``{"id", "state": running|succeeded|failed|revoked, "steps": {step id: {"state",
        "service", "action", "result"|"error"}}}`` (``state`` "unknown" once expired)."""
        info = self.state.info(self.id)
        return {"id": self.id, "state": info.get("state", "unknown"), "steps": self.state.steps(self.id),
                **{key: info[key] for key in ("failed_step", "error", "error_type") if key in info}}

    def poll(self) -> tuple[bool, Any]:
        """(True, result) once it succeeded; (False, None) while it runs; raises
        :class:`~amqprpc.errors.WorkflowFailed` once it failed or was revoked."""
        info = self.state.info(self.id)
        state = info.get("state")
        if state == SUCCEEDED:
            import json

            return True, json.loads(info["result"])
        if state in (FAILED, REVOKED):
            steps = self.state.steps(self.id)
            step = info.get("failed_step", "")
            failed = steps.get(step, {})
            results = {key: value["result"] for key, value in steps.items() if "result" in value}
            raise WorkflowFailed(self.id, step, failed.get("service", ""), failed.get("action", ""),
                                 info.get("error", "revoked"), info.get("error_type", "Revoked"), results)
        if state is None:
            raise LookupError(f"workflow {self.id} is unknown (never started, or expired)")
        return False, None

    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait (polling Redis) up to ``timeout`` seconds (for ever: None) for the final
        result; :class:`~amqprpc.errors.CallTimeout` when it has not come by then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.02
        while True:
            done, value = self.poll()
            if done:
                return value
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CallTimeout(f"workflow {self.id}: no result within {timeout:g}s")
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 1.5, 0.5)

    def revoke(self) -> bool:
        """Stop it: its steps not yet started are acked unrun; the result raises WorkflowFailed."""
        return self.state.revoke(self.id)

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id}>"


class AsyncWorkflowHandle:
    """The same for asyncio: ``await handle.result(timeout=S)``; Redis is read off the loop."""

    def __init__(self, handle: WorkflowHandle) -> None:
        self.handle = handle
        self.id = handle.id

    async def status(self) -> Dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self.handle.status)

    async def result(self, timeout: Optional[float] = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = 0.02
        while True:
            done, value = await loop.run_in_executor(None, self.handle.poll)
            if done:
                return value
            if deadline is not None and loop.time() >= deadline:
                raise CallTimeout(f"workflow {self.id}: no result within {timeout:g}s")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    async def revoke(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.handle.revoke)
