"""Every `appliance …` command named in an error hint or message exists, with the options it names.

Hints are how the appliance tells a person what to do next; one that names a command the
parser does not know sends them nowhere. This test reads every backquoted `appliance …`
in the product's source and checks its subcommands and flags against the real parser.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from appliance.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "registry", "pipeline", "keys", "policies", "airgap")
_MENTION = re.compile(r"`(appliance(?: [^`]*)?)`")


def _mentions() -> list[tuple[str, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for m in _MENTION.finditer(path.read_text(encoding="utf-8")):
                found.append((f"{path.relative_to(ROOT)}", m.group(1)))
    return found


def _variants(command: str) -> list[list[str]]:
    """The words of a mention, shell pipes and ellipses cut, `a|b|c` alternatives expanded."""
    command = command.split(" | ")[0].replace("…", " ").replace("\\", "")
    words = [w for w in command.split()[1:] if not w.startswith(("{", '"', "'"))]
    out: list[list[str]] = [[]]
    for w in words:
        if "|" in w and not w.startswith("-"):
            out = [prefix + [alt] for prefix in out for alt in w.split("|")]
        else:
            out = [prefix + [w] for prefix in out]
    return out


def _check(parser: argparse.ArgumentParser, words: list[str], mention: str) -> None:
    options = {o: a for a in parser._actions for o in a.option_strings}
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    value_next = False
    for i, word in enumerate(words):
        if value_next:
            value_next = False  # the value of the option before
        elif word.startswith("-"):
            name = word.split("=")[0]
            assert name in options, f"{mention!r}: {parser.prog} has no option {word}"
            value_next = "=" not in word and options[name].nargs != 0
        elif subs is not None:
            assert word in subs.choices, f"{mention!r}: {parser.prog} has no subcommand {word!r} (it has {sorted(subs.choices)})"
            return _check(subs.choices[word], words[i + 1 :], mention)
        # else: a positional value (RUN, FILE, a digest): fine


MENTIONS = _mentions()


def test_the_source_names_commands_at_all() -> None:
    assert len(MENTIONS) > 30


@pytest.mark.parametrize(("where", "mention"), MENTIONS, ids=[f"{w}:{m[:40]}" for w, m in MENTIONS])
def test_every_named_command_exists(where: str, mention: str) -> None:
    parser = build_parser()
    for words in _variants(mention):
        _check(parser, words, f"{where}: {mention}")


def test_the_checker_catches_a_command_that_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="no subcommand"):
        _check(build_parser(), ["model", "sign"], "model sign")
    with pytest.raises(AssertionError, match="no option"):
        _check(build_parser(), ["ledger", "verify", "--hed"], "ledger verify --hed")


def test_the_cli_run_in_process_gives_back_the_sigterm_handler(capsys: pytest.CaptureFixture[str]) -> None:
    # A test runner that calls main() keeps its own SIGTERM handling afterwards (CI's pytest
    # once outlived a SIGTERM because an in-process CLI call had left its handler behind).
    import signal

    from tests.conftest import cli

    before = signal.getsignal(signal.SIGTERM)
    cli(capsys, "recipe", "check", "/nonexistent.toml")
    assert signal.getsignal(signal.SIGTERM) is before
