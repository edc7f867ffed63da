"""Choose the next GPU batch from what a worker holds.

The worker calls `next_batch` each time the GPU is free, with every job it holds and
the time. The answer is one batch to run now, or how long to wait for company.

Contract (checked by property tests):
- an item past its deadline is expired, never batched: it must fail fast, without
  the GPU;
- a batch has at most `max_batch` rows, and its predicted steps fit `token_budget`
  unless it is a single item (an item larger than the budget still runs, alone);
- an item never waits for company longer than `max_wait_s` while the GPU is free;
- realtime items go first; a bulk item waiting `aging_s` or longer ranks as realtime,
  so bulk is never starved; a bulk item that has not aged never displaces a realtime
  one (if any realtime item is left out, no un-aged bulk item is in);
- among items of the same rank, the batch is built around the oldest one, with the
  items closest to it in predicted length (length buckets): rows of a batch finish
  together and decode at similar lengths;
- an item marked `alone` (it was in a batch the worker died in) runs in a batch of
  its own, when it is the oldest of the best rank: if it kills the worker again it
  takes no batch-mates with it.

`refill` answers the same question for a batch already running whose rows freed up
(iteration-level batching): the same ranking, but no waiting for company (the batch
runs anyway), no `alone` item, nothing past the rows and steps left, and a few rows
past `max_batch` kept for realtime items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PlanItem(Generic[T]):
    payload: T
    steps: int
    priority: str = "bulk"
    arrived: float = 0.0  # when the worker received it (any monotonic clock, seconds)
    deadline: float | None = None  # on the same clock as `arrived`
    alone: bool = False  # must not share a batch


@dataclass(frozen=True)
class Policy:
    max_batch: int
    token_budget: int
    max_wait_s: float = 0.1
    aging_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.max_wait_s < 0 or self.aging_s < 0:
            raise ValueError("max_wait_s and aging_s must be >= 0")


@dataclass
class Decision(Generic[T]):
    batch: list[PlanItem[T]] = field(default_factory=list)
    expired: list[PlanItem[T]] = field(default_factory=list)
    wait_s: float = 0.0  # when batch is empty: how long until a decision may change


def rank(item: PlanItem[T], now: float, policy: Policy) -> int:
    """0 for realtime and aged bulk, 1 for the rest."""
    if item.priority == "realtime" or now - item.arrived >= policy.aging_s:
        return 0
    return 1


def next_batch(items: Sequence[PlanItem[T]], now: float, policy: Policy) -> Decision[T]:
    expired = [i for i in items if i.deadline is not None and now > i.deadline]
    if expired:
        items = [i for i in items if not (i.deadline is not None and now > i.deadline)]
    if not items:
        return Decision(expired=expired)
    by_rank: list[list[PlanItem[T]]] = [[], []]
    for item in items:
        by_rank[rank(item, now, policy)].append(item)

    batch: list[PlanItem[T]] = []
    used = 0
    left_out = False
    for group in by_rank:
        if not group:
            continue
        if left_out:
            break  # a lower rank may only fill a batch its betters fit in entirely
        if not batch:
            anchor = min(group, key=lambda i: (i.arrived, i.steps))
            batch, used = [anchor], anchor.steps
            group = [i for i in group if i is not anchor]
            if anchor.alone:
                left_out = True
                break
        if any(i.alone for i in group):
            left_out = True  # they run later, alone: no reason to wait for them
            group = [i for i in group if not i.alone]
        # Closest in predicted length first (log scale: 100 vs 200 steps is as far
        # apart as 1000 vs 2000), oldest first among equals.
        group.sort(key=lambda i: (abs(math.log(max(i.steps, 1) / max(batch[0].steps, 1))), i.arrived))
        for item in group:
            if len(batch) < policy.max_batch and used + item.steps <= policy.token_budget:
                batch.append(item)
                used += item.steps
            else:
                left_out = True

    oldest = min(i.arrived for i in items)
    full = left_out or len(batch) >= policy.max_batch
    waited = now - oldest
    if full or waited >= policy.max_wait_s:
        return Decision(batch, expired)
    # Everything fits: only the oldest item's wait running out, or new arrivals (which
    # ask again anyway), can change the answer.
    return Decision([], expired, policy.max_wait_s - waited)


def refill(items: Sequence[PlanItem[T]], now: float, policy: Policy, rows: int, steps: int,
           reserved: int = 0) -> Decision[T]:
    """Items to join a running batch with `rows` free rows and `steps` of its token
    budget left; expired items are reported as by `next_batch`. `reserved` of the free
    rows are for realtime items only: a realtime job joins a batch full of bulk rows at
    its next step, instead of waiting for one of them to end."""
    expired = [i for i in items if i.deadline is not None and now > i.deadline]
    live = [i for i in items if not (i.deadline is not None and now > i.deadline)]
    # An item too large for what is left waits for a batch of its own, as does a suspect.
    fits = [i for i in live if not i.alone and i.steps <= steps]
    if rows < 1 or not fits:
        return Decision(expired=expired)
    now_policy = replace(policy, max_wait_s=0.0)
    # The kept rows first, realtime items only (aged bulk, which ranks with realtime,
    # must not take them); then the other rows by the usual ranking.
    urgent = [i for i in fits if i.priority == "realtime"]
    lane = next_batch(urgent, now, replace(now_policy, max_batch=min(reserved, rows), token_budget=steps)).batch \
        if urgent and reserved > 0 else []
    left_steps = steps - sum(i.steps for i in lane)
    rest = [i for i in fits if i not in lane and i.steps <= left_steps]
    main = next_batch(rest, now, replace(now_policy, max_batch=rows - reserved, token_budget=left_steps)).batch \
        if rest and rows > reserved and left_steps > 0 else []
    return Decision(lane + main, expired)
