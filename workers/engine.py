"""The synthesis engine: ChatTTS modules driven by ttspool's own batched generation loop.

ChatTTS provides the model classes, checkpoint loading, tokenizer, normalizer and
speaker codec. The loop is ours because `Chat.infer` batches statically (one voice,
one seed, one set of sampling params per batch; finished rows computed until the
longest ends; every row decoded padded to the longest). Here each row carries its own
voice, seed, sampling params and length cap; a finished row leaves the batch (its KV
cache rows are dropped); and each row is decoded at its own length.

One engine per process, one batch at a time: the modules are not safe for concurrent
calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scheduler.lengths import predicted_steps

from . import faults, sampling
from .model_assets import ModelAssets, resolve
from .random_models import build_config

log = logging.getLogger(__name__)

REPETITION_PENALTY = 1.05  # ChatTTS' default for code inference
REPETITION_WINDOW = 16


@dataclass(frozen=True)
class SynthRequest:
    text: str  # already normalized (Engine.normalize)
    voice: int | str = 2
    seed: int = 0
    speed: int = 5
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
    max_tokens: int = 2048


@dataclass
class SynthResult:
    audio: np.ndarray | None  # float32 mono at Engine.sample_rate
    steps: int
    error: str | None = None
    codes: np.ndarray | None = None  # [steps, num_vq] audio codes the GPT sampled


class EngineError(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"TTSPOOL_DEVICE={name} but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise EngineError("float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


class Engine:
    sample_rate = 24_000

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", dtype: str = "auto",
                 compile: bool = False) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if compile and self.device.type != "cuda":
            # Inductor's CPU backend fails to build this model's kernels with torch 2.11
            # (a C++ compile error, seen on x86-64), and CPU serving gains little from it.
            raise EngineError("TTSPOOL_COMPILE=1 needs a CUDA device")
        self.compile = compile
        self._model_name = model
        self._model_dir = model_dir
        self.assets: ModelAssets | None = None
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        # GPT row-steps the last batch computed: what dropping finished rows saves.
        self.last_row_steps = 0

    @property
    def model_id(self) -> str:
        assert self.assets is not None, "engine not loaded"
        return self.assets.model_id

    def load(self) -> "Engine":
        import ChatTTS

        t0 = time.perf_counter()
        self.assets = resolve(self._model_name, self._model_dir)
        if self.assets.random:
            log.warning(
                "model %s has RANDOM weights: it produces noise, and each job's length is "
                "predicted from its text (for tests and benchmarks only)", self.assets.model_id,
            )
        chat = ChatTTS.Chat(logging.getLogger("ChatTTS"))
        chat.config = build_config(self.assets.overrides)
        if not chat._load(device=self.device, **self.assets.paths()):
            raise EngineError(f"ChatTTS could not load the model from {self.assets.root}")
        self.chat = chat
        self.gpt = chat.gpt.gpt
        self.gpt.to(self.dtype)
        chat.embed.to(self.dtype)
        chat.decoder.to(self.dtype)
        # Vocos stays float32: its ISTFT needs it, and the waveform must be float32 anyway.
        self.num_vq = chat.config.gpt.num_vq
        self.num_codes = chat.config.gpt.num_audio_tokens
        self.eos = self.num_codes - 1
        with torch.no_grad():
            # Weight-normed heads would recompute their weights on every call: fold once.
            self.head_w = torch.stack([h.weight.detach() for h in chat.embed.head_code]).to(self.dtype)
            self.code_emb = torch.stack([e.weight.detach() for e in chat.embed.emb_code]).to(self.dtype)
            self.text_emb = chat.embed.emb_text.weight.detach().to(self.dtype)
        self.tokenizer = chat.tokenizer
        if self.compile:
            # Shapes change every step (the cache grows, finished rows leave), so the
            # graph is compiled for dynamic shapes; the first batches pay for compiling.
            self.gpt = torch.compile(self.gpt, dynamic=True)
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        warm = self.generate([SynthRequest(text=self.normalize("warm up"), max_tokens=8)])[0]
        if warm.error is not None:
            # A worker that cannot synthesize must not take jobs only to fail them all.
            raise EngineError(f"warm-up synthesis failed: {warm.error}")
        self.warmup_seconds = time.perf_counter() - t1
        log.info(
            "engine ready: model=%s device=%s dtype=%s load=%.1fs warmup=%.1fs",
            self.model_id, self.device, str(self.dtype).removeprefix("torch."),
            self.load_seconds, self.warmup_seconds,
        )
        return self

    def normalize(self, text: str) -> str:
        return self.chat.normalizer(text, do_text_normalization=True, do_homophone_replacement=True)

    def target_steps(self, req: SynthRequest) -> int | None:
        """Random weights never end sensibly: their length is predicted from the text."""
        if self.assets is not None and self.assets.random:
            return predicted_steps(req.text, req.speed, req.max_tokens)
        return None

    @lru_cache(maxsize=256)
    def speaker(self, voice: int | str) -> torch.Tensor:
        """Unit-norm speaker embedding; an int is a seed, as `torch.manual_seed(s); sample_random_speaker()`."""
        spk = self.chat.speaker
        if isinstance(voice, int):
            gen = torch.Generator(device="cpu").manual_seed(voice)
            vec = torch.randn(spk.dim, generator=gen, dtype=spk.std.dtype).to(spk.std.device)
            vec = vec.mul_(spk.std).add_(spk.mean)
        else:
            vec = torch.from_numpy(spk._decode(voice))
        if vec.numel() != spk.dim:
            raise ValueError(f"voice has {vec.numel()} dimensions; this model's speakers have {spk.dim}")
        return F.normalize(vec.float(), p=2.0, dim=0).to(self.device, self.dtype)

    def _prompt_ids(self, req: SynthRequest) -> list[int]:
        prompt = self.chat.speaker.decorate_code_prompts([req.text], f"[speed_{req.speed}]", None, "spk")[0]
        return self.tokenizer._tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # -- generation ---------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: Sequence[SynthRequest], keep_finished: bool = False) -> list[SynthResult]:
        """Synthesize a batch. A failing row fails alone: on an error the batch is split
        in halves and retried, down to single rows (this also sheds CUDA OOMs).

        `keep_finished` computes finished rows until the longest ends, as static
        batching does (same output, more work): only for measuring what dropping
        them saves."""
        try:
            faults.inject([r.text for r in requests])
            rows = self._generate_rows(requests, keep_finished)
            return self._decode(rows)
        except Exception as err:  # noqa: BLE001 - any failure is isolated to its row below
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(requests) == 1:
                log.warning("synthesis failed: %s", err)
                return [SynthResult(None, 0, f"{type(err).__name__}: {err}")]
            mid = len(requests) // 2
            log.warning("batch of %d failed (%s); retrying in halves", len(requests), type(err).__name__)
            return self.generate(requests[:mid], keep_finished) + self.generate(requests[mid:], keep_finished)

    def _generate_rows(self, requests: Sequence[SynthRequest], keep_finished: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: the GPT hidden states [steps, hidden] that feed the decoder, and the codes."""
        dev, n = self.device, len(requests)
        prompts = [self._prompt_ids(r) for r in requests]
        speakers = [self.speaker(r.voice) for r in requests]
        targets = [self.target_steps(r) for r in requests]
        caps = [t if t is not None else r.max_tokens for r, t in zip(requests, targets)]
        max_len, max_steps = max(map(len, prompts)), max(caps)

        # Left padding, so every row's next position is the last column.
        ids = torch.zeros(n, max_len, dtype=torch.long)
        mask = torch.zeros(n, max_len, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, max_len - len(p):] = torch.tensor(p)
            mask[i, max_len - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        emb = self.text_emb[ids]
        spk_pos = ids.eq(self.tokenizer.spk_emb_ids)
        emb[spk_pos] = torch.stack(speakers).unsqueeze(1).expand(-1, max_len, -1)[spk_pos]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        seeds = torch.tensor([r.seed for r in requests], device=dev)
        temp = torch.tensor([float(r.temperature) for r in requests], device=dev)
        top_p = torch.tensor([float(r.top_p) for r in requests], device=dev)
        top_k = torch.tensor([r.top_k for r in requests], device=dev)
        cap = torch.tensor(caps, device=dev)
        forced = torch.tensor([t is not None for t in targets], device=dev)
        alive = torch.arange(n, device=dev)  # original row of each running row
        lengths = torch.zeros(n, dtype=torch.long, device=dev)
        finished = torch.zeros(n, dtype=torch.bool, device=dev)  # per running row
        hid_buf = torch.zeros(n, max_steps, self.gpt.config.hidden_size, dtype=self.dtype, device=dev)
        tok_buf = torch.zeros(n, max_steps, self.num_vq, dtype=torch.long, device=dev)

        cache, hidden = self._prefill(emb, mask, pos, [len(p) for p in prompts])
        pos = pos[:, -1:]
        self.last_row_steps = 0
        for step in range(max_steps):
            self.last_row_steps += int(alive.numel())
            hid_buf[alive, step] = hidden
            logits = torch.einsum("bh,qvh->bqv", hidden, self.head_w).float()
            # Never end on the first step (ChatTTS' ensure_non_empty), never end a
            # random model's row before its predicted length.
            if step == 0:
                logits[:, :, self.eos] = float("-inf")
            logits[forced[alive], :, self.eos] = float("-inf")
            window = tok_buf[alive, max(0, step - REPETITION_WINDOW):step]
            steps_t = torch.full_like(alive, step)
            tokens = sampling.sample(logits, seeds[alive], steps_t, temp[alive], top_p[alive],
                                     top_k[alive], window, REPETITION_PENALTY)
            tok_buf[alive, step] = tokens
            ended_eos = tokens.eq(self.eos).any(dim=1)
            ended_cap = (step + 1) >= cap[alive]
            ended = torch.where(ended_eos, step, step + 1)
            lengths[alive] = torch.where(finished, lengths[alive], ended)
            finished = finished | ended_eos | ended_cap
            if bool(finished.all()):
                break
            if bool(finished.any()) and not keep_finished:
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, tokens, mask, pos = alive[keep], tokens[keep], mask[keep], pos[keep]
                finished = finished[keep]
            emb = self.code_emb[torch.arange(self.num_vq, device=dev), tokens].sum(dim=1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = self.gpt(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                           past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1]
        return [(hid_buf[i, : int(lengths[i])], tok_buf[i, : int(lengths[i])]) for i in range(n)]

    def _prefill(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 lens: list[int]) -> tuple[Any, torch.Tensor]:
        """The prompt pass, in groups of similar prompt length merged into one
        left-padded cache: a padded position costs as much as a real token, and mixed
        traffic pads short prompts to the longest (half the positions, measured)."""
        from transformers import DynamicCache

        n, width = mask.shape
        order = sorted(range(n), key=lambda i: lens[i])
        groups: list[list[int]] = [[]]
        for i in order:
            g = groups[-1]
            if g and lens[i] > lens[g[0]] + max(4, lens[g[0]] // 4):
                groups.append([])
            groups[-1].append(i)
        cache = DynamicCache()
        if len(groups) == 1:
            out = self.gpt(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                           past_key_values=cache, use_cache=True)
            return cache, out.last_hidden_state[:, -1]
        hidden = emb.new_empty(n, emb.shape[-1])
        merged: list[list[torch.Tensor]] = []
        for g in groups:
            rows, w = torch.tensor(g, device=emb.device), lens[g[-1]]
            part = DynamicCache()
            out = self.gpt(inputs_embeds=emb[rows, -w:], attention_mask=mask[rows, -w:],
                           position_ids=pos[rows, -w:], past_key_values=part, use_cache=True)
            hidden[rows] = out.last_hidden_state[:, -1]
            for layer_idx, layer in enumerate(part.layers):
                if len(merged) <= layer_idx:
                    k, v = layer.keys, layer.values
                    merged.append([k.new_zeros(n, k.shape[1], width, k.shape[3]),
                                   v.new_zeros(n, v.shape[1], width, v.shape[3])])
                # Masked positions: their zeros are never attended to.
                merged[layer_idx][0][rows, :, width - w:] = layer.keys
                merged[layer_idx][1][rows, :, width - w:] = layer.values
        for layer_idx, (k, v) in enumerate(merged):
            cache.update(k, v, layer_idx)
        return cache, hidden

    def _decode(self, rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[SynthResult]:
        """Decoder + Vocos at each row's own length; rows of equal length go together
        (no padding, so no row's audio depends on another's)."""
        results: list[SynthResult | None] = [None] * len(rows)
        by_len: dict[int, list[int]] = {}
        for i, (hidden, _) in enumerate(rows):
            by_len.setdefault(int(hidden.shape[0]), []).append(i)
        for steps, idx in by_len.items():
            if steps == 0:
                for i in idx:
                    results[i] = SynthResult(None, 0, "the model produced no audio for this text")
                continue
            hidden = torch.stack([rows[i][0] for i in idx]).transpose(1, 2).to(self.dtype)
            wavs = self.chat.vocos.decode(self.chat.decoder(hidden).float()).float().cpu().numpy()
            for i, wav in zip(idx, wavs):
                results[i] = SynthResult(wav, steps, codes=rows[i][1].cpu().numpy())
        return [r for r in results if r is not None]
