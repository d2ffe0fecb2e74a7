"""Every verb and flag of Ollama's command line is Mullama's too, or refused with its reason (issue #18).

Ollama's verbs and flags are kept as data (``tests/data/ollama_cli.json``,
read from its ``cmd/`` sources). A script written for ``ollama`` must never
meet argparse's "invalid choice" or "unrecognized arguments" after the
word is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mullama.cli import main
from mullama.cli.unsupported import REFUSED_FLAGS, REFUSED_VERBS

OLLAMA = {verb: flags for verb, flags in json.loads(
    (Path(__file__).parent / "data" / "ollama_cli.json").read_text()).items() if not verb.startswith("_")}
VERBS = [verb for verb in OLLAMA if verb]
FLAGS = [(verb, flag) for verb, flags in OLLAMA.items() for flag in flags]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("verb", VERBS)
def test_each_ollama_verb_exists_or_is_refused_with_its_reason(verb, capsys, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:1")  # nothing may reach a daemon
    status, out, err = _run(capsys, verb, "--help")
    if verb in REFUSED_VERBS:
        assert status == 1 and out == ""
        assert err == f"Error: {verb} is not supported: {REFUSED_VERBS[verb]}\n"
    else:
        assert status == 0 and out.startswith("usage: mullama ") and err == ""


@pytest.mark.parametrize("verb, flag", FLAGS)
def test_each_ollama_flag_is_accepted_or_refused_with_its_reason(verb, flag, capsys, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:1")
    name = flag.rstrip("=")
    if verb in REFUSED_VERBS:
        status, _, err = _run(capsys, verb, name)
        assert status == 1 and err.startswith(f"Error: {verb} is not supported: ")
        return
    status, out, _ = _run(capsys, *([verb] if verb else []), "--help")
    assert status == 0
    refused = REFUSED_FLAGS.get(verb, {})
    if name in refused:
        argv = [verb, "m", name] + (["x"] if flag.endswith("=") else [])
        status, _, err = _run(capsys, *argv)
        assert status == 1 and err == f"Error: {name} is not supported: {refused[name][1]}\n"
    else:
        # Listed in the verb's help, as itself or as the short form of a long flag.
        assert f" {name}" in out.replace(",", " ").replace("[", " ")


def test_a_refused_verb_is_refused_whatever_follows_it(capsys):
    status, out, err = _run(capsys, "runner", "--port", "1234", "--model", "x")
    assert (status, out) == (1, "") and err.startswith("Error: runner is not supported: ")


def test_refused_verbs_are_not_listed_in_the_help(capsys):
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.strip()}
    assert {"serve", "run", "tui"} <= listed and not listed & set(REFUSED_VERBS)
