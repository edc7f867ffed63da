"""How `ttspool` reads its arguments: each option's help names its default, and the
global options (the broker) work before the subcommand and after it."""

from __future__ import annotations

import argparse
from typing import Any, Iterator

# Given after the subcommand too (`ttspool submit --broker-url URL TEXT`): there a
# subcommand's parser sets the option only when it is given (SUPPRESS), or its default
# would overwrite what the top-level parser read before the subcommand.
_GLOBAL_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--broker-url", {"metavar": "URL", "help": "redis://... (TTSPOOL_BROKER_URL)"}),
)
_GLOBAL_TITLE = "global options"
_GLOBAL_NOTE = "given before the subcommand or after it"


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, unless the help says it already or there
    is none to tell (None, or a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not has_default(action) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`ttspool`'s parsers; subcommands' parsers are of their parent's class, so every
    one of them formats help with HelpFormatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def has_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth printing in its help."""
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def parsers(root: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under `root`, root included, each with its command line (`ttspool model fetch`)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        parser = todo.pop(0)
        if id(parser) in seen:  # an alias names a parser once more
            continue
        seen.add(id(parser))
        yield parser.prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


def add_global_options(root: argparse.ArgumentParser) -> None:
    """The global options, on `root` and on every subcommand's parser below it (call it
    once the subcommands are added)."""
    for _, parser in list(parsers(root)):
        group = parser.add_argument_group(_GLOBAL_TITLE, _GLOBAL_NOTE)
        for flag, options in _GLOBAL_OPTIONS:
            group.add_argument(flag, **options, **({} if parser is root else {"default": argparse.SUPPRESS}))
