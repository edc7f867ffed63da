"""Random-weight ChatTTS models with the real module classes, for offline tests and benchmarks.

`random-tiny` has a 2-layer, hidden-64 GPT (everything else full size) and builds in
about a second; `random-full` has the real shapes. Both are seeded, so every machine
builds the same weights, and both are written in the official asset layout, so the
engine loads them through exactly the code path the official weights take.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pybase16384 as b14
import torch

from storage.models.cache import touch_used
from storage.models.manifest import Manifest, write_manifest

RANDOM_MODELS = ("random-tiny", "random-full")
FORMAT_VERSION = 1
MANIFEST = "ttspool.json"

_TINY_GPT = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2}

# ChatTTS' control tokens; BERT would split "[Stts]" into "[", "Stts", "]" unless they
# are registered as special tokens.
_SPECIAL = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[spk_emb]", "[empty_spk]", "[Stts]", "[Ptts]",
     "[Sbreak]", "[Pbreak]", "[Ebreak]", "[uv_break]", "[v_break]", "[lbreak]", "[laugh]"]
    + [f"[speed_{i}]" for i in range(10)]
    + [f"[break_{i}]" for i in range(8)]
    + [f"[oral_{i}]" for i in range(10)]
    + [f"[laugh_{i}]" for i in range(3)]
)


def overrides_for(name: str) -> dict[str, Any]:
    """Config overrides (relative to ChatTTS' Config) for a random model's shapes."""
    if name == "random-full":
        return {}
    if name == "random-tiny":
        gen = torch.Generator().manual_seed(7)
        hidden = _TINY_GPT["hidden_size"]
        std = (torch.rand(hidden, generator=gen) * 0.02 + 0.01).half()
        mean = (torch.randn(hidden, generator=gen) * 0.05).half()
        spk_stat = b14.encode_to_string(torch.cat([std, mean]).numpy().tobytes())
        return {"gpt": dict(_TINY_GPT), "embed_hidden": hidden, "decoder_idim": hidden // 2, "spk_stat": spk_stat}
    raise ValueError(f"unknown random model {name!r}; expected one of {', '.join(RANDOM_MODELS)}")


def build_config(overrides: dict[str, Any]):  # -> ChatTTS.config.Config
    """A fresh ChatTTS Config with the overrides applied.

    Config()'s sub-objects are class-level defaults shared by every instance, so they are
    replaced, never mutated.
    """
    from ChatTTS.config import config as c

    gpt = c.GPT(**{**asdict(c.GPT()), **overrides.get("gpt", {})})
    hidden = overrides.get("embed_hidden", gpt.hidden_size)
    embed = c.Embed(**{**asdict(c.Embed()), "hidden_size": hidden})
    idim = overrides.get("decoder_idim", gpt.hidden_size // 2)
    decoder = c.Decoder(**{**asdict(c.Decoder()), "idim": idim, "odim": idim})
    kwargs: dict[str, Any] = {"gpt": gpt, "embed": embed, "decoder": decoder}
    if "spk_stat" in overrides:
        kwargs["spk_stat"] = overrides["spk_stat"]
    return c.Config(**kwargs)


def _tokenizer(out: Path, num_text_tokens: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    vocab: dict[str, int] = {}
    for tok in _SPECIAL:
        vocab.setdefault(tok, len(vocab))
    for ch in [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch.lower(), len(vocab))
        vocab.setdefault("##" + ch.lower(), len(vocab))
    # Common CJK characters fill the rest, as the official vocabulary's do.
    cp = 0x4E00
    while len(vocab) < num_text_tokens - 1 and cp <= 0x9FFF:
        vocab.setdefault(chr(cp), len(vocab))
        cp += 1
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.add_special_tokens({"additional_special_tokens": _SPECIAL[5:]})
    fast.save_pretrained(str(out))


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def _build(name: str, out: Path) -> None:
    from ChatTTS.model import DVAE, Embed
    from transformers import LlamaConfig, LlamaModel
    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    overrides = overrides_for(name)
    cfg = build_config(overrides)
    asset = out / "asset"
    asset.mkdir(parents=True)
    torch.manual_seed(20240607)

    g = cfg.gpt
    llama = LlamaModel(LlamaConfig(
        hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
        num_attention_heads=g.num_attention_heads, num_hidden_layers=g.num_hidden_layers,
        max_position_embeddings=g.max_position_embeddings, vocab_size=8,
    ))
    llama.save_pretrained(str(asset / "gpt"), safe_serialization=True)

    embed = Embed(cfg.embed.hidden_size, cfg.embed.num_audio_tokens, cfg.embed.num_text_tokens, cfg.embed.num_vq)
    _save(embed, asset / "Embed.safetensors")

    dvae = DVAE(decoder_config=asdict(cfg.dvae.decoder), encoder_config=asdict(cfg.dvae.encoder),
                vq_config=asdict(cfg.dvae.vq), dim=cfg.dvae.decoder.idim)
    _save(dvae, asset / "DVAE.safetensors")
    decoder = DVAE(decoder_config=asdict(cfg.decoder), dim=cfg.decoder.idim)
    _save(decoder, asset / "Decoder.safetensors")

    vocos = Vocos(
        feature_extractor=instantiate_class(args=(), init=asdict(cfg.vocos.feature_extractor)),
        backbone=instantiate_class(args=(), init=asdict(cfg.vocos.backbone)),
        head=instantiate_class(args=(), init=asdict(cfg.vocos.head)),
    )
    _save(vocos, asset / "Vocos.safetensors")

    _tokenizer(asset / "tokenizer", cfg.embed.num_text_tokens)
    (out / MANIFEST).write_text(json.dumps(
        {"model": name, "random": True, "format": FORMAT_VERSION, "overrides": overrides}, indent=1))


def ensure_random_model(name: str, cache_dir: Path) -> Path:
    """Build the model once into the cache (atomically, under a lock) and return its folder."""
    import fcntl

    overrides_for(name)
    target = cache_dir / f"{name}-v{FORMAT_VERSION}"
    if (target / MANIFEST).exists():
        touch_used(target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        # Several workers on one node may start together; one builds, the others wait.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MANIFEST).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            rng_state = torch.get_rng_state()
            try:
                _build(name, tmp)
            finally:
                torch.set_rng_state(rng_state)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    touch_used(target)
    return target


def export_random(name: str, cache_dir: Path, out: Path) -> Manifest:
    """Write a random model's files and their manifest.json into `out`, as a mirror serves them."""
    src = ensure_random_model(name, cache_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    return write_manifest(out, name)

