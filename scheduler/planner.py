"""Turn buffered jobs into GPU batches.

Contract: every item lands in exactly one batch; no batch has more than `max_batch`
rows; no batch's predicted steps exceed `token_budget` unless it holds a single item
(an item larger than the budget still runs, alone). Realtime items come before bulk
ones, and items of similar predicted length share a batch, so rows finish together
and little work is padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")

PRIORITY_ORDER = {"realtime": 0, "bulk": 1}


@dataclass(frozen=True)
class PlanItem(Generic[T]):
    payload: T
    steps: int
    priority: str = "bulk"


def plan_batches(
    items: Sequence[PlanItem[T]], max_batch: int, token_budget: int
) -> list[list[PlanItem[T]]]:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    batches: list[list[PlanItem[T]]] = []
    for priority in sorted({i.priority for i in items}, key=lambda p: PRIORITY_ORDER.get(p, 9)):
        group = sorted((i for i in items if i.priority == priority), key=lambda i: i.steps)
        current: list[PlanItem[T]] = []
        used = 0
        for item in group:
            if current and (len(current) >= max_batch or used + item.steps > token_budget):
                batches.append(current)
                current, used = [], 0
            current.append(item)
            used += item.steps
        if current:
            batches.append(current)
    return batches
