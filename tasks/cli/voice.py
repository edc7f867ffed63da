"""`ttspool voice add|list|show|rm|export`: the voice library (tasks/voices.py), the
operator's side: the shared space every tenant uses, or with `--tenant NAME` that
tenant's own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("voice", help="named voices every worker can use (docs/VOICES.md)")
    verbs = v.add_subparsers(dest="verb", required=True)
    space = argparse.ArgumentParser(add_help=False)
    space.add_argument("--tenant", metavar="NAME",
                       help="this tenant's voices (as its jobs see the library), not the shared ones")

    a = verbs.add_parser("add", parents=[space], help="add a voice, or with --replace its next version")
    a.add_argument("name", help="letters, digits, '.', '_' or '-' (as job ids)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=int, help="the speaker this seed draws")
    src.add_argument("--speaker", help="a ChatTTS speaker string (- reads it from standard input)")
    src.add_argument("--from-wav", type=Path, metavar="FILE",
                     help="a 1-15 s recording of the voice (any common audio format); needs --transcript")
    src.add_argument("--mix", metavar="A:0.7,B:0.3", help="a weighted blend of seed, speaker or mix voices")
    a.add_argument("--transcript", help="what is said in the --from-wav recording")
    a.add_argument("--description", default="", help="a note for people choosing a voice")
    a.add_argument("--replace", action="store_true",
                   help="make a new version of an existing (or built-in) voice; with --tenant, also the tenant's "
                        "own voice in place of a shared or built-in one")
    a.add_argument("--json", action="store_true", help="print the new record as JSON")
    a.set_defaults(handler=_add)

    ls = verbs.add_parser("list", parents=[space], help="every voice, the built-in OpenAI names included")
    ls.add_argument("--json", action="store_true", help="one JSON list")
    ls.set_defaults(handler=_list)

    sh = verbs.add_parser("show", parents=[space], help="one voice's current version")
    sh.add_argument("name", help="the voice's name")
    sh.add_argument("--json", action="store_true", help="print the record as JSON")
    sh.set_defaults(handler=_show)

    rm = verbs.add_parser("rm", parents=[space], help="remove a voice (what it replaced comes back)")
    rm.add_argument("name", help="the voice's name")
    rm.set_defaults(handler=_rm)

    ex = verbs.add_parser("export", parents=[space], help="print the voice's ChatTTS speaker string")
    ex.add_argument("name", help="the voice's name")
    ex.set_defaults(handler=_export)


def _library(settings: Settings, args: argparse.Namespace) -> Any:
    from storage import storage_for

    from ..broker_redis import redis_client
    from ..voices import VoiceLibrary

    index = redis_client(settings.broker_url, settings.redis_master_name, socket_timeout=10, socket_connect_timeout=5)
    return VoiceLibrary(storage_for(settings), index, args.tenant)


def _print(voice: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(voice.summary(), ensure_ascii=False))
        return
    info = voice.summary()
    detail = {"seed": f"seed {info.get('seed')}", "speaker": "speaker string",
              "mix": " + ".join(f"{p['weight']:g} {p['source']}" for p in info.get("mix", [])),
              "recording": f"{info.get('duration_s')} s recording: {info.get('transcript', '')!r}"}[voice.kind]
    origin = {"builtin": "built-in", "shared": f"v{voice.version}",
              "tenant": f"v{voice.version} ({voice.tenant})"}[voice.space]
    print(f"{voice.name}\t{origin}\t{voice.kind}\t{detail}" + (f"\t{voice.description}" if voice.description else ""))


def _add(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from ..voices import VoiceError

    speaker = sys.stdin.read().strip() if args.speaker == "-" else args.speaker
    recording = None
    if args.from_wav is not None:
        try:
            recording = args.from_wav.read_bytes()
        except OSError as err:
            raise VoiceError(f"cannot read {args.from_wav}: {err.strerror or err}") from None
    voice = _library(settings, args).add(args.name, seed=args.seed, speaker=speaker, recording=recording,
                                   transcript=args.transcript, mix=args.mix, description=args.description,
                                   replace=args.replace)
    _print(voice, args.json)
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    voices = _library(settings, args).list()
    if args.json:
        print(json.dumps([v.summary() for v in voices], ensure_ascii=False))
    else:
        for voice in voices:
            _print(voice, False)
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    _print(_library(settings, args).require(args.name, fresh=True), args.json)
    return 0


def _rm(args: argparse.Namespace, settings: Settings) -> int:
    voice = _library(settings, args).remove(args.name)
    print(f"removed {voice.name} (v{voice.version})")
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from ..voices import VoiceError

    voice = _library(settings, args).require(args.name, fresh=True)
    if voice.embedding is None:
        raise VoiceError(f"voice {voice.name!r} is a recording: it has audio codes, not a speaker string")
    if voice.embedding.speaker is not None:
        print(voice.embedding.speaker)
        return 0
    # A seed's or a mix's vector depends on the model's speaker statistics (not its
    # weights): read from the model's config, without loading the model.
    from ChatTTS.model.speaker import Speaker

    from workers.engine.assets import ModelFetch, resolve
    from workers.engine.random_models import build_config
    from workers.engine.speakers import embedding_of, speaker_stats

    overrides = {} if settings.model == "chattts" else resolve(
        settings.model, settings.model_dir, ModelFetch.from_settings(settings)).overrides
    std, mean = speaker_stats(build_config(overrides).spk_stat)
    print(Speaker._encode(embedding_of(voice.embedding, std, mean)))
    return 0
