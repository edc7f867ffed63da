"""workers/engine/kv_cache.py: the in-place cache holds exactly what DynamicCache would."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from workers.engine.kv_cache import SLACK, RowCache


def _kv(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, cols, 4, generator=g), torch.randn(rows, 2, cols, 4, generator=g)


def test_appends_past_the_slack_match_concatenation() -> None:
    ours, ref = RowCache(), DynamicCache()
    for step in range(2 * SLACK + 5):  # grows its buffer twice
        k, v = _kv(3, 7 if step == 0 else 1, step)
        got = ours.update(k, v, 0)
        want = ref.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == ref.get_seq_length() == 7 + 2 * SLACK + 4


def test_rows_leave_join_and_padding_is_dropped() -> None:
    ours = RowCache()
    k, v = _kv(3, 5, 1)
    ours.update(k, v, 0)
    ours.batch_select_indices(torch.tensor([0, 2]))
    expect_k, expect_v = k[[0, 2]], v[[0, 2]]
    # New rows with a longer prompt: the running rows get left padding (zeros).
    nk, nv = _kv(2, 8, 2)
    joining = DynamicCache()
    joining.update(nk, nv, 0)
    ours.append_rows(joining)
    pad = torch.zeros(2, 2, 3, 4)
    expect_k = torch.cat([torch.cat([pad, expect_k], dim=2), nk])
    expect_v = torch.cat([torch.cat([pad, expect_v], dim=2), nv])
    layer = ours.layers[0]
    assert torch.equal(layer.keys, expect_k) and torch.equal(layer.values, expect_v)
    # The new rows leave; the padding every remaining row has goes, and appends go on.
    ours.batch_select_indices(torch.tensor([0, 1]))
    ours.drop_leading(3)
    step_k, step_v = _kv(2, 1, 3)
    got_k, got_v = ours.update(step_k, step_v, 0)
    assert torch.equal(got_k, torch.cat([k[[0, 2]], step_k], dim=2))
    assert torch.equal(got_v, torch.cat([v[[0, 2]], step_v], dim=2))
    assert ours.get_seq_length() == 6
