"""The synthesis engine: ChatTTS modules driven by ttspool's own batched generation loop.

ChatTTS provides the model classes, checkpoint loading, tokenizer, normalizer and
speaker codec. The loop is ours because `Chat.infer` batches statically (one voice,
one seed, one set of sampling params per batch; finished rows computed until the
longest ends; every row decoded padded to the longest). Here each row carries its own
voice, seed, sampling params and length cap; a finished row leaves the batch (its KV
cache rows are dropped) and new rows may join it (workers.engine.running_batch); and each row
is decoded at its own length, as soon as it ends.

One engine per process, one batch at a time: the modules are not safe for concurrent
calls.
"""

from __future__ import annotations

import io
import logging
import time
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from tasks.text.lengths import predicted_steps

from .cpu_linear import can_pack, pack_linears
from .int8_linear import check_quant, quantize_linears
from .assets import ModelAssets, ModelFetch, resolve
from .random_models import build_config
from .dtypes import pick_device, pick_dtype
from .engine_error import EngineError
from .normalizer import Normalizer
from .parts import ModelParts
from .requests import (BatchStream, Blend, Event, Reference, RowsFree, SynthRequest, SynthResult, Voice,
                       finished_rows)
from .speakers import blend, seed_vector
from .running_batch import RunningBatch

log = logging.getLogger(__name__)


class Engine:
    sample_rate = 24_000

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", dtype: str = "auto",
                 compile: bool = False, fetch: ModelFetch | None = None, quant: str = "none",
                 on_admit: Callable[[Sequence[str], Sequence[str]], None] | None = None) -> None:
        self.device = pick_device(device)
        self.dtype, self.dtype_reason = pick_dtype(dtype, self.device)
        check_quant(quant, self.device, self.dtype)
        self.quant = quant
        if compile and self.device.type != "cuda":
            # Inductor's CPU backend fails to build this model's kernels with torch 2.11
            # (a C++ compile error, seen on x86-64), and CPU serving gains little from it.
            raise EngineError("TTSPOOL_COMPILE=1 needs a CUDA device")
        self.compile = compile
        self._model_name = model
        self._model_dir = model_dir
        self._fetch = fetch
        # Called with the texts of the rows running and of those joining, as rows are
        # admitted, inside the batch's error handling: the seam the fault tests inject
        # through (workers/faults.py).
        self.on_admit = on_admit
        self.assets: ModelAssets | None = None
        self.import_seconds = 0.0  # of ChatTTS (and what it brings: transformers' models, vocos, numba)
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        # GPT row-steps the last batch computed: what dropping finished rows saves.
        self.last_row_steps = 0

    @property
    def numerics(self) -> str:
        """The dtype, and the GPT's weight quantization if any: "bfloat16+int8"."""
        dtype = str(self.dtype).removeprefix("torch.")
        return dtype if self.quant == "none" else f"{dtype}+{self.quant}"

    @property
    def model_id(self) -> str:
        assert self.assets is not None, "engine not loaded"
        return self.assets.model_id

    def load(self) -> "Engine":
        t0 = time.perf_counter()
        import ChatTTS

        self.import_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.assets = resolve(self._model_name, self._model_dir, self._fetch)
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
        self._normalizer = Normalizer(chat.normalizer)
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
        if self.quant == "int8":
            quantize_linears(self.gpt)
        elif self.device.type == "cpu" and can_pack(self.dtype):
            pack_linears(self.gpt)
        if self.compile:
            # Shapes change every step (the cache grows, finished rows leave), so the
            # graph is compiled for dynamic shapes; the first batches pay for compiling.
            self.gpt = torch.compile(self.gpt, dynamic=True)
        self.parts = ModelParts(
            device=self.device, dtype=self.dtype, gpt=self.gpt, head_w=self.head_w, code_emb=self.code_emb,
            text_emb=self.text_emb, num_vq=self.num_vq, eos=self.eos, spk_emb_id=self.tokenizer.spk_emb_ids,
            prompt_ids=self._prompt_ids, prompt_codes=_prompt_codes, speaker=self.speaker,
            target_steps=self.target_steps,
        )
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        warm = self.generate([SynthRequest(text=self.normalize("warm up"), max_tokens=8)])[0]
        if warm.error is not None:
            # A worker that cannot synthesize must not take jobs only to fail them all.
            raise EngineError(f"warm-up synthesis failed: {warm.error}")
        self.warmup_seconds = time.perf_counter() - t1
        log.info(
            "engine ready: model=%s device=%s dtype=%s (%s) quant=%s load=%.1fs warmup=%.1fs",
            self.model_id, self.device, str(self.dtype).removeprefix("torch."), self.dtype_reason, self.quant,
            self.load_seconds, self.warmup_seconds,
        )
        return self

    def normalize(self, text: str) -> str:
        return self._normalizer(text)

    def target_steps(self, req: SynthRequest) -> int | None:
        """Random weights never end sensibly: their length is predicted from the text."""
        if self.assets is not None and self.assets.random:
            return predicted_steps(req.text, req.speed, req.max_tokens)
        return None

    @lru_cache(maxsize=256)
    def speaker(self, voice: Voice) -> torch.Tensor:
        """Unit-norm speaker embedding; an int is a seed, as `torch.manual_seed(s); sample_random_speaker()`."""
        spk = self.chat.speaker
        if isinstance(voice, Reference):
            # Never read: a recording's row has no [spk_emb] position (ChatTTS' [empty_spk]).
            return torch.zeros(spk.dim, device=self.device, dtype=self.dtype)
        if isinstance(voice, Blend):
            vec = blend([(self.speaker(v), w) for v, w in voice.parts])
        elif isinstance(voice, int):
            vec = seed_vector(voice, spk.std, spk.mean)
        else:
            vec = torch.from_numpy(spk._decode(voice))
        if vec.numel() != spk.dim:
            raise ValueError(f"voice has {vec.numel()} dimensions; this model's speakers have {spk.dim}")
        return F.normalize(vec.float(), p=2.0, dim=0).to(self.device, self.dtype)

    def reference_codes(self, wav: bytes) -> torch.Tensor:
        """A 24 kHz mono recording -> its audio codes [positions, num_vq] (the DVAE encoder,
        as `Chat.sample_audio_speaker`), on the engine's device."""
        pcm, rate = sf.read(io.BytesIO(wav), dtype="float32")
        if rate != self.sample_rate or pcm.ndim != 1:
            raise ValueError(f"a reference recording must be {self.sample_rate} Hz mono")
        dvae = self.chat.dvae
        device = next(dvae.parameters()).device
        with torch.inference_mode():
            codes = dvae.sample_audio(torch.from_numpy(pcm).to(device))
        return codes.to(self.device, torch.long).t().contiguous()

    def _prompt_ids(self, req: SynthRequest) -> list[int]:
        if isinstance(req.voice, Reference):
            prompt = self.chat.speaker.decorate_code_prompts(
                [req.text], f"[speed_{req.speed}]", req.voice.transcript, None)[0]
        else:
            prompt = self.chat.speaker.decorate_code_prompts([req.text], f"[speed_{req.speed}]", None, "spk")[0]
        return self.tokenizer._tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # -- generation ---------------------------------------------------------------

    def generate(self, requests: Sequence[SynthRequest], keep_finished: bool = False) -> list[SynthResult]:
        """Synthesize a batch; results in the order of `requests`.

        `keep_finished` computes finished rows until the longest ends, as static
        batching does (same output, more work): only for measuring what dropping
        them saves."""
        out: list[SynthResult | None] = [None] * len(requests)
        for i, res in finished_rows(self.stream(requests, keep_finished=keep_finished)):
            out[i] = res
        return [r for r in out if r is not None]

    def stream(self, requests: Sequence[SynthRequest], max_rows: int = 0,
               keep_finished: bool = False) -> BatchStream:
        """Run a batch: its events are (index, result) as each row ends, index counting
        `requests` first and then every request added, in order; and, while fewer than
        `max_rows` rows run (0: the batch takes no new rows), RowsFree after each step.

        Iteration-level batching: requests added on a RowsFree join the running batch at
        once, so a backlog keeps every row busy instead of waiting for the batch's
        longest row. Express requests (`SynthRequest.express`) step ahead of the others,
        in a lane of their own.

        A failing row fails alone: on an error every row still running is retried in
        halves, down to single rows (this also sheds CUDA OOMs), and the stream ends
        without asking for rows again."""
        return BatchStream(lambda inbox: self._isolated(requests, inbox, max_rows, keep_finished))

    @torch.inference_mode()
    def _isolated(self, requests: Sequence[SynthRequest], inbox: list[SynthRequest], max_rows: int,
                  keep_finished: bool) -> Iterator[Event]:
        pending: dict[int, SynthRequest] = {}
        try:
            yield from self._run_rows(requests, inbox, max_rows, keep_finished, pending)
        except Exception as err:  # noqa: BLE001 - any failure is isolated to its row below
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            left = list(pending.items())
            if not left:
                raise
            if len(left) == 1:
                log.warning("synthesis failed: %s", err)
                yield left[0][0], SynthResult(None, 0, f"{type(err).__name__}: {err}")
                return
            log.warning("batch of %d failed (%s); retrying in halves", len(left), type(err).__name__)
            mid = len(left) // 2
            for half in (left[:mid], left[mid:]):
                results = self.generate([r for _, r in half], keep_finished)
                yield from zip([i for i, _ in half], results)

    def _run_rows(self, requests: Sequence[SynthRequest], inbox: list[SynthRequest], max_rows: int,
                  keep_finished: bool, pending: dict[int, SynthRequest]) -> Iterator[Event]:
        if not requests:
            return
        grows = bool(max_rows) and not keep_finished
        max_rows = max_rows or len(requests)
        # Two lanes of one batch: while an express row runs, only the express lane steps
        # and the other rows wait with their cache kept (a row's tokens do not depend on
        # its batch-mates, so pausing changes no output). Static batching (keep_finished)
        # has one lane: it measures what dropping finished rows saves, nothing else.
        bulk, express = RunningBatch(self.parts, max_rows), RunningBatch(self.parts, max_rows)

        next_index = 0

        def admit(new: Sequence[SynthRequest]) -> None:
            nonlocal next_index
            index = list(range(next_index, next_index + len(new)))
            next_index += len(new)
            for i, r in zip(index, new):
                pending[i] = r
            if self.on_admit is not None:
                # Once the new rows are pending, so what it raises retries them too.
                self.on_admit(bulk.texts + express.texts, [r.text for r in new])
            fast = [not keep_finished and r.express for r in new]
            for lane, want in ((express, True), (bulk, False)):
                lane.admit([r for r, f in zip(new, fast) if f is want], [i for i, f in zip(index, fast) if f is want])

        admit(requests)
        self.last_row_steps = 0
        while bulk.size or express.size:
            lane = express if express.size else bulk
            self.last_row_steps += lane.size
            done = lane.step(drop=not keep_finished)
            if done:
                failed = [(i, codes) for i, _, codes in done if i in lane.errors]
                for i, codes in failed:
                    del pending[i]
                    yield i, SynthResult(None, len(codes), lane.errors.pop(i))
                ok = [row for row in done if row[0] in pending]
                for (i, _, _), res in zip(ok, self._decode([(h, c) for _, h, c in ok])):
                    del pending[i]
                    yield i, res
            if lane.size:
                lane.forward()
            running = bulk.size + express.size
            if grows and running < max_rows:
                yield RowsFree(max_rows - running)
                if inbox:
                    more = list(inbox)
                    inbox.clear()
                    admit(more)

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
                if not np.isfinite(wav).all():
                    results[i] = SynthResult(None, steps, f"non-finite audio from the decoder "
                                                          f"({str(self.dtype).removeprefix('torch.')})")
                    continue
                results[i] = SynthResult(wav, steps, codes=rows[i][1].cpu().numpy())
        return [r for r in results if r is not None]


def _prompt_codes(req: SynthRequest) -> torch.Tensor | None:
    return req.voice.codes if isinstance(req.voice, Reference) else None
