"""Per-tenant token buckets in Redis, taken atomically at submit time.

Configured with TTSPOOL_RATE_LIMITS, e.g. "acme=10/s:burst=20,beta=600/m,*=5/s":
RATE/UNIT (s, m or h) refills the bucket; `burst` (default: the RATE number) is its
size. `*` applies to every tenant not named. Jobs without a tenant are not limited.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

import redis

from .errors import RateLimited

BUCKET_PREFIX = "ttspool:ratelimit:"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_ENTRY = re.compile(r"(?P<tenant>\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})=(?P<n>\d+(?:\.\d+)?)/(?P<unit>[smh])(?::burst=(?P<burst>\d+))?")

# All buckets of one submit are checked first and only then taken, so a submit that
# spans several tenants takes all of its tokens or none. Redis' own clock (TIME) keeps
# every producer on the same time. Returns {1} or {0, index of the short bucket, tokens}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
for i, key in ipairs(KEYS) do
  local rate, burst, n = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  if tokens < n then
    return {0, i, tostring(tokens)}
  end
  levels[i] = tokens - n
end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1])
  redis.call('HSET', key, 'tokens', tostring(levels[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {1}
"""


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: int

    def describe(self) -> str:
        unit = "s" if self.rate >= 1 else "m" if self.rate * 60 >= 1 else "h"
        return f"{self.rate * _UNITS[unit]:g}/{unit}, burst {self.burst}"


def parse_limits(raw: str) -> dict[str, Limit]:
    """Parse TTSPOOL_RATE_LIMITS; raises ValueError naming the bad entry."""
    limits: dict[str, Limit] = {}
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"TTSPOOL_RATE_LIMITS entry {entry!r} must look like tenant=10/s:burst=20 "
                "(unit s, m or h; burst optional; tenant * for all others)"
            )
        n = float(m["n"])
        burst = int(m["burst"]) if m["burst"] else math.ceil(n)
        if n <= 0 or burst < 1:
            raise ValueError(f"TTSPOOL_RATE_LIMITS entry {entry!r}: rate and burst must be positive")
        limits[m["tenant"]] = Limit(n / _UNITS[m["unit"]], burst)
    return limits


class RateLimiter:
    def __init__(self, limits: Mapping[str, Limit], client: redis.Redis) -> None:
        self.limits = dict(limits)
        self._take = client.register_script(_TAKE)

    def limit_for(self, tenant: str) -> Limit | None:
        return self.limits.get(tenant) or self.limits.get("*")

    def take(self, tenants: Iterable[str | None]) -> None:
        """Take one token per job from each tenant's bucket, or none and raise RateLimited."""
        wanted = [(t, n, lim) for t, n in Counter(t for t in tenants if t).items()
                  if (lim := self.limit_for(t)) is not None]
        if not wanted:
            return
        args: list[float] = []
        for _, n, lim in wanted:
            args += [lim.rate, lim.burst, n]
        res = self._take(keys=[BUCKET_PREFIX + t for t, _, _ in wanted], args=args)
        if int(res[0]) == 1:
            return
        tenant, n, lim = wanted[int(res[1]) - 1]
        have = float(res[2])
        if n > lim.burst:
            raise RateLimited(f"tenant {tenant!r} submitted {n} jobs at once; its rate limit "
                              f"({lim.describe()}) never allows more than {lim.burst}", tenant, math.inf)
        wait = (n - have) / lim.rate
        raise RateLimited(f"tenant {tenant!r} is over its rate limit ({lim.describe()}): {n} job(s) "
                          f"asked, {int(have)} available; nothing enqueued, retry in {wait:.1f} s",
                          tenant, wait)
