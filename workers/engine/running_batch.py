"""The rows one engine batch is generating, and the GPT steps that advance them.

Rows join (`admit`: their prompts run through the GPT and their KV cache joins the
batch's, left-padded to a common width) and leave (`step` hands back the rows that
ended; their cache rows are dropped) at any step, so a backlog keeps every row busy.
Each row has its own step counter, seed, sampling params and cap, and its tokens do
not depend on which rows share the batch: positions are per row, padding is masked,
and sampling is a pure function of (seed, step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from . import sampling
from .kv_cache import RowCache

if TYPE_CHECKING:
    from .parts import ModelParts
    from .requests import SynthRequest

REPETITION_PENALTY = 1.05  # ChatTTS' default for code inference
REPETITION_WINDOW = 16
# The per-row tensors admit() builds for joining rows (tokens and mask come from step
# and forward); _keep() selects these and those when rows leave.
_JOINED = ("slot", "seed", "temp", "top_p", "top_k", "cap", "forced", "t", "length", "finished", "pos", "hidden")


class RunningBatch:
    # One entry per running row (dim 0), set by admit(), selected by _keep():
    slot: torch.Tensor  # its rows of hid_buf / tok_buf
    seed: torch.Tensor
    temp: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    cap: torch.Tensor  # steps it may run
    forced: torch.Tensor  # random model: EOS banned, runs exactly `cap` steps
    t: torch.Tensor  # its own step counter
    length: torch.Tensor  # steps it produced, once finished
    finished: torch.Tensor
    pos: torch.Tensor  # position id of its next input
    hidden: torch.Tensor  # GPT output to sample its next codes from
    tokens: torch.Tensor  # codes sampled at the last step
    mask: torch.Tensor  # [rows, cache width]: 0 on left padding

    def __init__(self, parts: "ModelParts", max_rows: int) -> None:
        self.e = parts
        self.dev = parts.device
        self.max_rows = max_rows
        self.index: list[int] = []  # per row: its position in the stream's order
        self.texts: list[str] = []
        self.errors: dict[int, str] = {}  # stream index -> why the row ended without audio
        self.cache: RowCache | None = None
        # Hidden states and codes of every running row, in a slot that is its own until
        # it ends: writing a step is one indexed copy for the whole batch.
        self.free_slots = list(range(max_rows))
        self.hid_buf: torch.Tensor | None = None
        self.tok_buf: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.index)

    # -- rows joining ----------------------------------------------------------------

    def admit(self, requests: Sequence["SynthRequest"], new_index: Sequence[int]) -> None:
        """Prefill `requests` (the stream's rows `new_index`) and join them to the running rows."""
        e, dev, n = self.e, self.dev, len(requests)
        if not n:
            return
        if self.size + n > self.max_rows:
            raise ValueError(f"{self.size} running + {n} new rows exceed the batch's {self.max_rows}")
        prompts = [e.prompt_ids(r) for r in requests]
        # A recording voice's audio codes follow its text, as in ChatTTS' tokenizer.
        codes = [e.prompt_codes(r) for r in requests]
        n_codes = [0 if c is None else int(c.shape[0]) for c in codes]
        lens = [len(p) + k for p, k in zip(prompts, n_codes)]
        speakers = [e.speaker(r.voice) for r in requests]
        targets = [e.target_steps(r) for r in requests]
        caps = [t if t is not None else r.max_tokens for r, t in zip(requests, targets)]
        width = max(lens)

        # Left padding, so every row's next position is the last column.
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, (p, k) in enumerate(zip(prompts, n_codes)):
            ids[i, width - k - len(p):width - k] = torch.tensor(p)
            mask[i, width - lens[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        emb = e.text_emb[ids]
        spk_pos = ids.eq(e.spk_emb_id)
        emb[spk_pos] = torch.stack(speakers).unsqueeze(1).expand(-1, width, -1)[spk_pos]
        heads = torch.arange(e.num_vq, device=dev)
        for i, c in enumerate(codes):
            if c is not None:
                # An audio position's input is the sum of its codes' embeddings, as for
                # the codes the model samples (forward()).
                emb[i, width - n_codes[i]:] = e.code_emb[heads, c].sum(dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, hidden = self._prefill(emb, mask, pos, lens)

        slots = [self.free_slots.pop(0) for _ in range(n)]
        self._reserve(max(caps))
        rows = {
            "slot": torch.tensor(slots, device=dev),
            "seed": torch.tensor([r.seed for r in requests], device=dev),
            "temp": torch.tensor([float(r.temperature) for r in requests], device=dev),
            "top_p": torch.tensor([float(r.top_p) for r in requests], device=dev),
            "top_k": torch.tensor([r.top_k for r in requests], device=dev),
            "cap": torch.tensor(caps, device=dev),
            "forced": torch.tensor([t is not None for t in targets], device=dev),
            "t": torch.zeros(n, dtype=torch.long, device=dev),
            "length": torch.zeros(n, dtype=torch.long, device=dev),
            "finished": torch.zeros(n, dtype=torch.bool, device=dev),
            "pos": pos[:, -1:],
            "hidden": hidden,
        }
        assert tuple(rows) == _JOINED
        if not self.size:
            self.cache, self.mask = cache, mask
            for name, value in rows.items():
                setattr(self, name, value)
        else:
            self._join(cache, mask)
            for name, value in rows.items():
                setattr(self, name, torch.cat([getattr(self, name), value]))
        self.index += list(new_index)
        self.texts += [r.text for r in requests]

    def _reserve(self, cap: int) -> None:
        have = 0 if self.hid_buf is None else self.hid_buf.shape[1]
        if cap <= have:
            return
        hid = torch.zeros(self.max_rows, cap, self.e.gpt.config.hidden_size, dtype=self.e.dtype, device=self.dev)
        tok = torch.zeros(self.max_rows, cap, self.e.num_vq, dtype=torch.long, device=self.dev)
        if self.hid_buf is not None and self.tok_buf is not None:
            hid[:, :have] = self.hid_buf
            tok[:, :have] = self.tok_buf
        self.hid_buf, self.tok_buf = hid, tok

    def _join(self, cache: RowCache, mask: torch.Tensor) -> None:
        """Append new rows' cache to the running one, left-padding the narrower side
        (masked positions: never attended to)."""
        assert self.cache is not None
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache.append_rows(cache)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])

    def _prefill(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 lens: list[int]) -> tuple[RowCache, torch.Tensor]:
        """The prompt pass, in groups of similar prompt length merged into one
        left-padded cache: a padded position costs as much as a real token, and mixed
        traffic pads short prompts to the longest (half the positions, measured)."""
        from transformers import DynamicCache

        gpt = self.e.gpt
        n, width = mask.shape
        order = sorted(range(n), key=lambda i: lens[i])
        groups: list[list[int]] = [[]]
        for i in order:
            g = groups[-1]
            if g and lens[i] > lens[g[0]] + max(4, lens[g[0]] // 4):
                groups.append([])
            groups[-1].append(i)
        cache = RowCache()
        if len(groups) == 1:
            out = gpt(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            return cache, out.last_hidden_state[:, -1]
        hidden = emb.new_empty(n, emb.shape[-1])
        merged: list[list[torch.Tensor]] = []
        for g in groups:
            rows, w = torch.tensor(g, device=emb.device), lens[g[-1]]
            part = DynamicCache()
            out = gpt(inputs_embeds=emb[rows, -w:], attention_mask=mask[rows, -w:],
                      position_ids=pos[rows, -w:], past_key_values=part, use_cache=True)
            hidden[rows] = out.last_hidden_state[:, -1]
            for layer_idx, layer in enumerate(part.layers):
                if len(merged) <= layer_idx:
                    k, v = layer.keys, layer.values
                    merged.append([k.new_zeros(n, k.shape[1], width, k.shape[3]),
                                   v.new_zeros(n, v.shape[1], width, v.shape[3])])
                merged[layer_idx][0][rows, :, width - w:] = layer.keys
                merged[layer_idx][1][rows, :, width - w:] = layer.values
        for layer_idx, (k, v) in enumerate(merged):
            cache.update(k, v, layer_idx)
        return cache, hidden

    # -- one step ---------------------------------------------------------------------

    def step(self, drop: bool) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Sample one code per head for every row from its hidden state; return the
        rows that ended as (index, hidden [len, H], codes [len, Q]). With `drop` they
        leave the batch at once; otherwise (static batching) all leave together when
        the last one ends."""
        e = self.e
        assert self.hid_buf is not None and self.tok_buf is not None
        live = (~self.finished).nonzero().squeeze(1)
        slot, t = self.slot[live], self.t[live]
        self.hid_buf[slot, t] = self.hidden[live]
        logits = torch.einsum("bh,qvh->bqv", self.hidden, e.head_w).float()
        # A row whose logits overflowed (half precision) or went NaN (a malformed speaker
        # vector) ends here with the reason, alone: sampling from them would raise for
        # the whole batch, or emit noise. Its logits are neutralized so sampling runs.
        broken = ~torch.isfinite(logits).flatten(1).all(dim=1) & ~self.finished
        if bool(broken.any()):
            for r in broken.nonzero().squeeze(1).tolist():
                self.errors[self.index[r]] = (f"non-finite logits at step {int(self.t[r])} "
                                              f"({str(e.dtype).removeprefix('torch.')})")
            logits[broken] = 0.0
        # Never end on the first step (ChatTTS' ensure_non_empty), never end a random
        # model's row before its predicted length.
        logits[(self.t == 0) | self.forced, :, e.eos] = float("-inf")
        back = self.t.unsqueeze(1) + torch.arange(-REPETITION_WINDOW, 0, device=self.dev)
        history = self.tok_buf[self.slot.unsqueeze(1), back.clamp(min=0)]
        tokens = sampling.sample(logits, self.seed, self.t, self.temp, self.top_p, self.top_k,
                                 history, REPETITION_PENALTY, back.ge(0))
        self.tok_buf[slot, t] = tokens[live]
        ended = tokens.eq(e.eos).any(dim=1) | broken
        newly = ~self.finished & (ended | (self.t + 1 >= self.cap))
        self.length = torch.where(newly, torch.where(ended, self.t, self.t + 1), self.length)
        self.finished = self.finished | newly
        self.t = self.t + 1
        self.tokens = tokens
        if drop:
            leaving = self.finished.nonzero().squeeze(1).tolist()
        else:
            leaving = list(range(self.size)) if bool(self.finished.all()) else []
        if not leaving:
            return []
        lengths = self.length.tolist()
        done = []
        for r in leaving:
            s, n = int(self.slot[r]), lengths[r]
            done.append((self.index[r], self.hid_buf[s, :n].clone(), self.tok_buf[s, :n].clone()))
            self.free_slots.append(s)
        gone = set(leaving)
        self._keep([r for r in range(self.size) if r not in gone])
        return done

    def _keep(self, rows: list[int]) -> None:
        self.index = [self.index[r] for r in rows]
        self.texts = [self.texts[r] for r in rows]
        if not rows:
            self.cache = None
            return
        keep = torch.tensor(rows, device=self.dev)
        assert self.cache is not None
        self.cache.batch_select_indices(keep)
        for name in (*_JOINED, "tokens", "mask"):
            setattr(self, name, getattr(self, name)[keep])
        # Columns every remaining row has as padding (the rows that needed them left):
        # attention would still read them on every step.
        lead = int(self.mask.any(dim=0).int().argmax())
        if lead:
            self.mask = self.mask[:, lead:]
            self.cache.drop_leading(lead)

    def forward(self) -> None:
        """Feed every row's sampled codes through the GPT: its next hidden state."""
        e = self.e
        emb = e.code_emb[torch.arange(e.num_vq, device=self.dev), self.tokens].sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        self.pos = self.pos + 1
        out = e.gpt(inputs_embeds=emb, attention_mask=self.mask, position_ids=self.pos,
                    past_key_values=self.cache, use_cache=True)
        self.hidden = out.last_hidden_state[:, -1]


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)
