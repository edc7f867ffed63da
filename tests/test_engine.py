"""The engine alone (in process, random-tiny on the CPU): per-row conditioning,
batch invariance, own-length decoding, failure isolation."""

from __future__ import annotations

import lzma

import numpy as np
import pybase16384 as b14
import pytest
import torch

from tasks.text.lengths import predicted_steps
from workers.engine.engine import Engine
from workers.engine.requests import SynthRequest, finished_rows

from .model_facts import steps_to_samples

SHORT = "A short line."
LONG = "A much longer line of text that keeps the batch busy for many more steps than the short one. " * 3


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("random-tiny", device="cpu").load()


def _req(engine: Engine, text: str, **kw: object) -> SynthRequest:
    return SynthRequest(text=engine.normalize(text), **kw)  # type: ignore[arg-type]


def test_each_row_has_its_own_length(engine: Engine) -> None:
    reqs = [_req(engine, SHORT, seed=1), _req(engine, LONG, seed=2), _req(engine, LONG, seed=3, max_tokens=40)]
    out = engine.generate(reqs)
    expected = [predicted_steps(r.text, r.speed, r.max_tokens) for r in reqs]
    assert [o.steps for o in out] == expected and expected[2] == 40
    for o in out:
        assert o.error is None and o.audio is not None
        assert o.audio.dtype == np.float32 and o.audio.shape == (steps_to_samples(o.steps),)
        assert np.isfinite(o.audio).all()


def test_same_job_alone_or_batched_gives_same_tokens_and_audio(engine: Engine) -> None:
    job = _req(engine, SHORT, voice=9, seed=77, temperature=0.7, top_k=40)
    alone = engine.generate([job])[0]
    others = [_req(engine, LONG, voice=v, seed=v, temperature=0.3 + v / 10, top_p=0.5 + v / 20) for v in range(5)]
    others[3] = _req(engine, SHORT, voice=1, seed=5)  # same length: decoded in one call with the job
    batched_all = engine.generate(others[:2] + [job] + others[2:])
    batched = batched_all[2]
    assert np.array_equal(batched.codes, alone.codes)
    assert batched.steps == alone.steps
    assert np.abs(batched.audio - alone.audio).max() < 1e-3


def test_voices_and_seeds_change_the_audio(engine: Engine) -> None:
    a, b, c = engine.generate([_req(engine, SHORT, voice=1, seed=5), _req(engine, SHORT, voice=2, seed=5),
                               _req(engine, SHORT, voice=1, seed=6)])
    assert a.steps == b.steps == c.steps
    # The seed drives sampling, so its codes differ. A voice conditions the GPT; with
    # tiny random weights that shifts its hidden states (and so the audio) only slightly.
    assert not np.array_equal(a.codes, c.codes)
    assert not np.array_equal(a.audio, b.audio) and not np.array_equal(a.audio, c.audio)


def test_speaker_string_voice_matches_its_seed(engine: Engine) -> None:
    # A speaker string is what ChatTTS' sample_random_speaker() returns: fp16, LZMA, base16384.
    vec = engine.speaker(4).float().cpu().numpy()
    spk = engine.chat.speaker
    raw = (torch.randn(spk.dim, generator=torch.Generator().manual_seed(4), dtype=spk.std.dtype) * spk.std + spk.mean)
    s = b14.encode_to_string(lzma.compress(raw.numpy().tobytes(), format=lzma.FORMAT_RAW,
                                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))
    assert np.allclose(engine.speaker(s).float().cpu().numpy(), vec, atol=1e-6)


def _wrong_dim_voice() -> str:
    return b14.encode_to_string(lzma.compress(np.zeros(7, np.float16).tobytes(), format=lzma.FORMAT_RAW,
                                              filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))


def test_a_failing_row_fails_alone(engine: Engine) -> None:
    reqs = [_req(engine, SHORT, seed=1), _req(engine, SHORT, voice=_wrong_dim_voice()), _req(engine, LONG, seed=2)]
    good1, bad, good2 = engine.generate(reqs)
    assert bad.audio is None and "dimensions" in (bad.error or "")
    assert good1.error is None and good2.error is None
    assert good1.steps == predicted_steps(reqs[0].text) and good2.steps == predicted_steps(reqs[2].text)


def test_keeping_finished_rows_changes_only_the_cost(engine: Engine) -> None:
    reqs = [_req(engine, SHORT, voice=3, seed=11), _req(engine, LONG, voice=4, seed=12, top_k=2),
            _req(engine, LONG[:60], voice=5, seed=13, temperature=1.2)]
    dropped = engine.generate(reqs)
    dropped_work = engine.last_row_steps
    kept = engine.generate(reqs, keep_finished=True)
    longest = max(o.steps for o in dropped)
    # Finished rows leave the batch: the work is each row's own length, not rows x longest.
    assert dropped_work == sum(o.steps for o in dropped) < len(reqs) * longest == engine.last_row_steps
    for d, k in zip(dropped, kept):
        assert d.steps == k.steps
        assert np.array_equal(d.codes, k.codes)
        assert np.abs(d.audio - k.audio).max() < 1e-3


def test_compile_flag_is_refused_without_cuda() -> None:
    from workers.engine.engine_error import EngineError

    with pytest.raises(EngineError, match="CUDA"):
        Engine("random-tiny", device="cpu", compile=True)


def test_rows_that_end_are_replaced_from_the_backlog(engine: Engine) -> None:
    # Iteration-level batching: two rows run at a time; whenever one ends, the next
    # job joins the running batch at once, and every job comes out as it would alone.
    jobs = [_req(engine, LONG, voice=1, seed=21), _req(engine, SHORT, voice=2, seed=22),
            _req(engine, SHORT + " Again.", voice=3, seed=23, top_k=3),
            _req(engine, LONG[:80], voice=4, seed=24, temperature=0.9), _req(engine, SHORT, voice=5, seed=25)]
    backlog = list(jobs[2:])
    asked: list[int] = []

    def refill(free: int) -> list[SynthRequest]:
        asked.append(free)
        taken = backlog[:1]
        del backlog[:1]
        return taken

    got = dict(finished_rows(engine.stream(jobs[:2], max_rows=2), refill))
    assert sorted(got) == list(range(len(jobs)))
    # Each refill came while the long first job was still running (one row free).
    assert asked[:3] == [1, 1, 1]
    assert engine.last_row_steps == sum(r.steps for r in got.values())
    alone = engine.generate(jobs)  # a batch of five, no refill
    for i, job in enumerate(jobs):
        assert got[i].steps == alone[i].steps == predicted_steps(job.text, job.speed, job.max_tokens)
        assert np.array_equal(got[i].codes, alone[i].codes)
        assert np.abs(got[i].audio - alone[i].audio).max() < 1e-3


def test_a_failing_refilled_row_fails_alone(engine: Engine) -> None:
    # The bad voice is found when its row joins the running batch: the rows running
    # then are retried and end as they would have, the bad one fails alone, and the
    # stream ends there (what refill did not hand out stays with the caller).
    later = _req(engine, SHORT, seed=31)
    backlog = [_req(engine, SHORT, voice=_wrong_dim_voice()), later]
    first = [_req(engine, LONG, seed=30), _req(engine, SHORT + " Short.", seed=32)]

    def refill(free: int) -> list[SynthRequest]:
        taken = backlog[:free]
        del backlog[:free]
        return taken

    got = dict(finished_rows(engine.stream(first, max_rows=2), refill))
    assert sorted(got) == [0, 1, 2] and backlog == [later]
    assert got[2].audio is None and "dimensions" in (got[2].error or "")
    for i, job in zip([0, 1], first):
        assert got[i].error is None
        assert np.array_equal(got[i].codes, engine.generate([job])[0].codes)


@pytest.mark.parametrize("express", [True, False])
def test_an_express_row_steps_alone_while_the_others_wait(engine: Engine, express: bool) -> None:
    # A realtime job joins two long rows after their 5th step. In the express lane it runs
    # alone to its end (a small batch's step rate) and the long rows then go on from where
    # they stopped; otherwise all three step together. Either way every row's tokens are
    # those of the job alone.
    long_rows = [_req(engine, LONG, seed=41), _req(engine, LONG[:150], voice=3, seed=42)]
    rt = _req(engine, SHORT, voice=4, seed=43, express=express)
    calls = 0
    seen_at: dict[int, int] = {}  # row -> refill calls before it ended (= steps before its last)

    def refill(free: int) -> list[SynthRequest]:
        nonlocal calls
        calls += 1
        return [rt] if calls == 5 else []

    got = {}
    for i, res in finished_rows(engine.stream(long_rows, max_rows=4), refill):  # a free row: asked every step
        seen_at[i], got[i] = calls, res
    n_rt = predicted_steps(rt.text)
    n_long = [predicted_steps(r.text) for r in long_rows]
    assert n_long[1] > 5 + n_rt and got[2].steps == n_rt
    # It joined after step 5 and ended at step 5 + n_rt either way: alone, or alongside.
    assert seen_at[2] == 4 + n_rt
    paused = n_rt if express else 0
    assert [seen_at[0], seen_at[1]] == [n - 1 + paused for n in n_long]
    assert engine.last_row_steps == sum(n_long) + n_rt
    for i, job in enumerate([*long_rows, rt]):
        alone = engine.generate([job])[0]
        assert np.array_equal(got[i].codes, alone.codes)
        assert np.abs(got[i].audio - alone.audio).max() < 1e-3


def test_cpu_engine_packs_the_gpt_linears(engine: Engine) -> None:
    from workers.engine.cpu_linear import PackedLinear, can_pack

    if not can_pack(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    assert not [m for m in engine.gpt.modules() if type(m) is torch.nn.Linear]
    assert [m for m in engine.gpt.modules() if isinstance(m, PackedLinear)]


def _recording(seconds: float = 3.0, rate: int = 24_000) -> bytes:
    import io

    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    out = io.BytesIO()
    sf.write(out, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def test_recording_voice_runs_batched_with_seed_voices(engine: Engine) -> None:
    from workers.engine.requests import Blend, Reference

    codes = engine.reference_codes(_recording())
    assert codes.shape == (141, engine.num_vq) and codes.dtype == torch.long  # 46.875 codes a second
    ref = Reference("digest", engine.normalize("Hello there, this is my voice."), codes)
    job = _req(engine, SHORT, voice=ref, seed=3, temperature=0.7)
    # The recording's transcript is in the prompt, and no speaker embedding slot is.
    prompt = engine.tokenizer._tokenizer.decode(engine._prompt_ids(job))
    assert "hello there" in prompt.lower() and "[empty_spk]" in prompt and "[spk_emb]" not in prompt
    alone = engine.generate([job])[0]
    batch = engine.generate([_req(engine, LONG, voice=4, seed=1), job,
                             _req(engine, SHORT, voice=Blend(((1, 0.7), (2, 0.3))), seed=3, temperature=0.7),
                             _req(engine, SHORT, voice=1, seed=3, temperature=0.7)])
    assert all(r.error is None for r in batch)
    assert np.array_equal(batch[1].codes, alone.codes) and np.abs(batch[1].audio - alone.audio).max() < 1e-3
    # The recording conditions the row: the same job with a seed voice gives other audio.
    assert not np.array_equal(batch[3].audio, alone.audio)


def test_mix_voice_is_the_normalized_blend(engine: Engine) -> None:
    from workers.engine.requests import Blend

    a, b = engine.speaker(1).float(), engine.speaker(2).float()
    mixed = engine.speaker(Blend(((1, 0.7), (2, 0.3)))).float()
    want = 0.7 * a + 0.3 * b
    # The vectors are stored in the engine's dtype: bfloat16 (auto on CPUs that have it)
    # keeps 8 bits of mantissa.
    tol = 1e-6 if engine.dtype == torch.float32 else 4e-3
    assert torch.allclose(mixed, want / want.norm(), atol=tol) and abs(float(mixed.norm()) - 1) < 10 * tol
    assert torch.allclose(engine.speaker(Blend(((1, 7.0), (2, 3.0)))).float(), mixed, atol=tol)  # relative weights
