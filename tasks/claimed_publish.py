"""Producers' kombu transport: a claimed job's message is pushed by the script that marks
its claim sent, so a claim is sent exactly when its message is in the queue.

A producer claims an id (tasks/claims.py) and then sends its message. Killed between the
two, it used to leave a claim with no message, which a retry of the same job took for a
job already sent: the id came back and nothing ever ran. Now the claim is written unsent,
and one Lua script checks that the claim is still this call's and unsent, pushes the
message and marks the claim sent; a retry that finds an unsent claim of the same job takes
it over (`take_over`) and sends the job itself. Whoever holds the claim when the script
runs pushes; anyone else's push is refused (`ClaimLost`): the job is sent once, whichever
producer dies or stalls, with no grace period to guess.

kombu pushes with one LPUSH in Channel._put; the script takes its place for messages
carrying the CLAIM_HEADER header (the claim's token), and every other message (a worker's
book retries, Celery's own) goes kombu's way. kombu builds transports from classes, as
the worker's does (workers/broker/transport.py).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from .claims import claim_key

CLAIM_HEADER = "ttspool_claim"

# KEYS[1]: the claim; KEYS[2]: the queue list. ARGV[1]: the claim's expected token;
# ARGV[2]: the message. The shebang makes Redis (>= 7) refuse the script whole at
# maxmemory, before it writes anything: never a claim marked sent without its message.
_PUSH = """#!lua
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, claim = pcall(cjson.decode, raw)
if not ok or type(claim) ~= 'table' or claim['k'] ~= ARGV[1] or claim['s'] ~= 0 then return 0 end
claim['s'] = nil
redis.call('SET', KEYS[1], cjson.encode(claim), 'KEEPTTL')
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1]: the claim. ARGV[1]: the claim as the caller read it; ARGV[2]: the new claim.
_TAKE_OVER = """#!lua
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

# KEYS[1]: the claim. ARGV[1]: the token of the call giving it back. Not a script with a
# shebang: a delete is what Redis still allows at maxmemory.
_GIVE_BACK = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, claim = pcall(cjson.decode, raw)
if not ok or type(claim) ~= 'table' or claim['k'] ~= ARGV[1] or claim['s'] ~= 0 then return 0 end
return redis.call('DEL', KEYS[1])
"""


class ClaimLost(Exception):
    """The message was not pushed: its claim was sent or taken over by another producer
    (a retry of the same job), which sends it instead."""


def take_over(client: Any, job_id: str, seen: bytes, new: str) -> bool:
    """Replace the unsent claim `seen` with `new` (this call's token, unsent), unless it
    changed since it was read; True when this call now holds it and must send the job."""
    return bool(client.eval(_TAKE_OVER, 1, claim_key(job_id), seen, new))


def give_back(client: Any, job_id: str, token: str) -> bool:
    """Delete the claim if it is still this call's and unsent (a retry may have taken it
    over, and a send whose reply was lost may have marked it sent: those stay)."""
    return bool(client.eval(_GIVE_BACK, 1, claim_key(job_id), token))


class ClaimedChannel(kombu_redis.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers") or {}
        token = headers.get(CLAIM_HEADER)
        if token is None:
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            if not client.eval(_PUSH, 2, claim_key(headers["id"]), key, token, dumps(message)):
                raise ClaimLost(headers["id"])


class ClaimedTransport(kombu_redis.Transport):
    Channel = ClaimedChannel


class ClaimedSentinelChannel(ClaimedChannel, kombu_redis.SentinelChannel):
    pass


class ClaimedSentinelTransport(kombu_redis.SentinelTransport):
    Channel = ClaimedSentinelChannel
