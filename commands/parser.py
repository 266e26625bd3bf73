"""The command line's parser: argparse that names a typo and suggests what was meant.

Plain argparse checks required options before it reports unknown ones, so
``trackbuf stats --campain spring`` says only that ``--campaign`` is required, and an
unknown option after a subcommand (``events --follow``) is reported by the top-level
parser with the top-level usage. ``SuggestingParser.error`` instead names every
unknown option of the subcommand that was typed, with the closest real one
(``difflib``; argparse suggests on its own only from Python 3.14), under that
subcommand's usage. Help text wraps between words, never inside a long value such as
a DSN.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)'")


class NoBreakFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only: a DSN or URL in ``now: ...`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


class SuggestingParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", NoBreakFormatter)
        super().__init__(*args, **kwargs)
        self._given: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Subcommand parsers are called with just their own part of the command line;
        # each keeps it, so an error can name what was typed there.
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        target = self._deepest()
        unknown = target.unknown_options()
        if unknown:
            lines = [target.suggest(option) for option in unknown]
            if message.startswith("unrecognized arguments"):
                message = "\n".join(lines)
            else:
                message = "\n".join([*lines, message])
        else:
            choice = _INVALID_CHOICE.search(message)
            if choice:
                message += target.closest(choice.group(1), target.subcommands())
        if target is not self:
            target.error_here(message)
        self.error_here(message)

    def error_here(self, message: str) -> NoReturn:
        super().error(message)

    def _deepest(self) -> SuggestingParser:
        """The subcommand parser the command line reached (``events`` in
        ``trackbuf events --follow``), or this one."""
        current: SuggestingParser = self
        while True:
            choices = current.subcommands()
            typed = [a for a in current._given if a in choices]
            nxt = choices.get(typed[0]) if typed else None
            if not isinstance(nxt, SuggestingParser):
                return current
            current = nxt

    def subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def unknown_options(self) -> list[str]:
        found = []
        for arg in self._given:
            if arg == "--":
                break
            if arg.startswith("-") and not _is_number(arg):
                name = arg.split("=", 1)[0]
                # argparse takes any unambiguous prefix (--camp for --campaign).
                if not any(o.startswith(name) for o in self._option_string_actions):
                    found.append(name)
        return found

    def suggest(self, option: str) -> str:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        return f"unrecognized option {option}" + self.closest(option, known)

    @staticmethod
    def closest(word: str, candidates: Sequence[str] | dict[str, Any]) -> str:
        match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
        return f" (did you mean {match[0]}?)" if match else ""


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True
