"""A workflow's state in Redis: its steps, its chord barriers, its result.

Keys (all under ``{prefix}{workflow id}``, all expiring ``ttl`` seconds after the last
write, 1 day by default):

- ``...:info``      hash: ``state`` (running, succeeded, failed, revoked), ``steps``,
  ``started``, and once it ended ``result`` (JSON) or ``failed_step``/``error``/``error_type``
- ``...:steps``     hash: step id -> JSON ``{"state", "service", "action", "result"|"error"}``
- ``...:claim:{step}``  the publish nonce of the copy of a step that runs (a second copy of
  the same step -- published twice when its predecessor's worker died between publishing
  and acking -- is acked unrun)
- ``...:group:{id}``  hash: member index -> its result (JSON), ``_owner`` the index whose
  result completed the group

Every decision that must happen once is one Lua script: claiming a step, settling a group
member (the member whose result completes the group, and only it, continues the
workflow, also when its message is redelivered), ending the workflow.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Mapping, Optional

DEFAULT_PREFIX = "amqprpc:workflow:"
DEFAULT_TTL = 86400  # seconds: a workflow's keys live this long after its last step

RUNNING, SUCCEEDED, FAILED, REVOKED = "running", "succeeded", "failed", "revoked"

# KEYS: info, claim, steps; ARGV: nonce, ttl, step id, step JSON (state running)
# -> "run" | "duplicate" | "stopped" (the workflow failed or was revoked)
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'failed' or state == 'revoked' then return 'stopped' end
local ok = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2])
if not ok and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'duplicate' end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 'run'
"""

# KEYS: group hash, info; ARGV: index, result JSON, size, ttl -> the results in order when this
# member's result completed the group (also on its redelivery), else nil
_SETTLE = """
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'failed' or state == 'revoked' then return nil end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local size = tonumber(ARGV[3])
local have = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], '_owner')
if have < size then return nil end
local owner = redis.call('HGET', KEYS[1], '_owner')
if not owner then
  redis.call('HSET', KEYS[1], '_owner', ARGV[1])
  owner = ARGV[1]
end
if owner ~= ARGV[1] then return nil end
local fields = {}
for i = 0, size - 1 do fields[#fields + 1] = tostring(i) end
return redis.call('HMGET', KEYS[1], unpack(fields))
"""

# KEYS: info; ARGV: ttl, then field/value pairs -> 1 when this call ended it (first end wins)
_END = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class WorkflowState:
    """One Redis holding the state of every workflow (any thread)."""

    def __init__(self, redis: Any, *, prefix: str = DEFAULT_PREFIX, ttl: int = DEFAULT_TTL) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._end = redis.register_script(_END)

    def key(self, workflow: str, *parts: str) -> str:
        return ":".join((f"{self.prefix}{workflow}", *parts))

    # --- the caller --------------------------------------------------------------------
    def begin(self, workflow: str, steps: List[Mapping[str, Any]]) -> None:
        """A new workflow, its steps all queued."""
        pipe = self.redis.pipeline()
        pipe.hset(self.key(workflow, "info"), mapping={"state": RUNNING, "steps": len(steps), "started": time.time()})
        pipe.hset(self.key(workflow, "steps"), mapping={
            step["id"]: json.dumps({"state": "queued", "service": step["s"], "action": step["a"]}) for step in steps})
        pipe.expire(self.key(workflow, "info"), self.ttl)
        pipe.expire(self.key(workflow, "steps"), self.ttl)
        pipe.execute()

    def info(self, workflow: str) -> Dict[str, str]:
        return {_text(k): _text(v) for k, v in self.redis.hgetall(self.key(workflow, "info")).items()}

    def steps(self, workflow: str) -> Dict[str, Dict[str, Any]]:
        raw = self.redis.hgetall(self.key(workflow, "steps"))
        return {_text(k): json.loads(v) for k, v in sorted(raw.items(), key=lambda item: _order(_text(item[0])))}

    def revoke(self, workflow: str) -> bool:
        """Stop it: steps not yet started are acked unrun. False when it had ended already."""
        return bool(self._end(keys=[self.key(workflow, "info")], args=[self.ttl, "state", REVOKED]))

    # --- the workers -------------------------------------------------------------------
    def claim(self, workflow: str, step: Mapping[str, Any], nonce: str) -> str:
        """Before a step runs: "run", "duplicate" (another copy of it runs or ran) or
        "stopped" (the workflow failed or was revoked)."""
        record = json.dumps({"state": RUNNING, "service": step["s"], "action": step["a"]})
        return _text(self._claim(keys=[self.key(workflow, "info"), self.key(workflow, "claim", step["id"]),
                                       self.key(workflow, "steps")], args=[nonce, self.ttl, step["id"], record]))

    def succeeded(self, workflow: str, step: Mapping[str, Any], result: Any) -> None:
        self._step(workflow, step, {"state": SUCCEEDED, "result": result})

    def settle(self, workflow: str, group: str, index: int, size: int, result: Any) -> Optional[List[Any]]:
        """A group member's result; the group's results in order when this member is the
        one that completed it (the same answer when its message comes again), else None."""
        done = self._settle(keys=[self.key(workflow, "group", group), self.key(workflow, "info")],
                            args=[index, json.dumps(result), size, self.ttl])
        return None if done is None else [json.loads(value) for value in done]

    def finish(self, workflow: str, result: Any) -> bool:
        return bool(self._end(keys=[self.key(workflow, "info")],
                              args=[self.ttl, "state", SUCCEEDED, "result", json.dumps(result),
                                    "ended", time.time()]))

    def fail(self, workflow: str, step: Mapping[str, Any], error: str, error_type: str) -> bool:
        self._step(workflow, step, {"state": FAILED, "error": error, "error_type": error_type})
        return bool(self._end(keys=[self.key(workflow, "info")],
                              args=[self.ttl, "state", FAILED, "failed_step", step["id"], "error", error,
                                    "error_type", error_type, "ended", time.time()]))

    def _step(self, workflow: str, step: Mapping[str, Any], record: Dict[str, Any]) -> None:
        record.update(service=step["s"], action=step["a"])
        pipe = self.redis.pipeline()
        pipe.hset(self.key(workflow, "steps"), step["id"], json.dumps(record))
        pipe.expire(self.key(workflow, "steps"), self.ttl)
        pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(step_id: str) -> List[int]:
    return [int(part) for part in step_id.split(".")]
