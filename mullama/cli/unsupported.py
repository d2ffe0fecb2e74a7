"""Ollama's verbs and flags that Mullama does not have, each refused with the reason and what to do instead.

A script written for ``ollama`` that uses one of them stops with one
``Error: ...`` line and exit status 1 that says why, never with argparse's
"invalid choice" or "unrecognized arguments", which read as a typo. They
are not listed by ``mullama --help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from mullama.errors import BadRequestError

#: Ollama's verbs with no Mullama counterpart, and why.
REFUSED_VERBS = {
    "signin": "Mullama has no ollama.com account: models come from Hugging Face (set HF_TOKEN for private "
              "repositories) or from local GGUF files",
    "login": "Mullama has no ollama.com account: models come from Hugging Face (set HF_TOKEN for private "
             "repositories) or from local GGUF files",
    "signout": "Mullama has no ollama.com account to sign out of",
    "logout": "Mullama has no ollama.com account to sign out of",
    "launch": "Mullama does not configure other tools: point them at http://127.0.0.1:11434 "
              "(Ollama's API), http://127.0.0.1:11434/v1 (OpenAI's) or http://127.0.0.1:11434 with the "
              "Anthropic SDK (/v1/messages)",
    "runner": "Mullama runs models in the daemon's own process; there is no separate runner to start",
    "gpu-discover": "Mullama lists its devices when the daemon starts (mullama serve) and in mullama ps",
}

#: Flags of Ollama's verbs that Mullama refuses, by verb: flag -> (takes a value, why).
REFUSED_FLAGS = {
    "create": {
        "--draft-quantize": (True, "Mullama does not quantize draft models while creating: create the draft at "
                                   "the quantization you want (mullama create NAME -q LEVEL) and name it in DRAFT"),
        "--experimental": (False, "Mullama creates models from GGUF files only: convert safetensors with "
                                  "llama.cpp's convert_hf_to_gguf.py first"),
    },
}


class _Refuse(argparse.Action):
    """A flag that stops the command at once with the reason it is refused."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not supported: {self.reason}")


def check_verb(argv: Sequence[str]) -> None:
    """Refuse a command line whose verb is one of :data:`REFUSED_VERBS`, whatever arguments follow it."""
    verb = next((word for word in argv if not word.startswith("-")), None)
    if verb in REFUSED_VERBS:
        raise BadRequestError(f"{verb} is not supported: {REFUSED_VERBS[verb]}")


def add_refused_flags(verb: str, sub: argparse.ArgumentParser) -> None:
    """Add ``verb``'s :data:`REFUSED_FLAGS` to its parser."""
    for flag, (takes_value, reason) in REFUSED_FLAGS.get(verb, {}).items():
        sub.add_argument(flag, action=_Refuse, reason=reason, nargs=None if takes_value else 0)

