"""README's commands are real: every `glowtrain` command it shows parses, with options the command has,
configs that exist and `--set` keys and values the config takes (parsed only, nothing runs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from glowtrain.cli import app
from glowtrain.config import dotted_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = typer.main.get_command(app)
# --set examples of what is refused (README's bad-input table) and the form's own placeholder.
NOT_KEYS = {"train.lrate", "section.key"}


FENCED = re.compile(r"^\s*```(\w*)\n(.*?)^\s*```", flags=re.M | re.S)  # a code block, indented or not


def _shell_lines() -> list[str]:
    """Each line of README's shell blocks, continuations joined."""
    blocks = FENCED.findall(README)
    return [line for lang, body in blocks if lang in ("bash", "sh", "")
            for line in re.sub(r"\\\n\s*", " ", body).splitlines()]


def _glowtrain_calls(words: list[str]) -> list[str] | None:
    """[subcommand, args...] where `words` run glowtrain (directly, via -m, or as docker's image); a word there
    that looks like a command must be one (`docker build -t glowtrain .` and `glowtrain --debug` are not calls)."""
    if "glowtrain" not in words:
        return None
    rest = words[words.index("glowtrain") + 1:]
    if not rest or not re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        return None
    assert rest[0] in COMMANDS.commands, f"README runs `glowtrain {rest[0]}`, which is no command: {shlex.join(words)}"
    return rest


def _readme_commands() -> list[str]:
    found = []
    for line in _shell_lines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # prose in a block (the run directory's tree)
            continue
        if _glowtrain_calls(words):
            found.append(shlex.join(words))
    prose = FENCED.sub("", README).replace("\n", " ")
    for span in re.findall(r"`((?:\S+=\S+ )?(?:python3? -m )?glowtrain [^`]+)`", prose):
        words = shlex.split(span.split("|")[0])
        if "..." not in words and not any(w.endswith("=...") for w in words) and _glowtrain_calls(words):
            found.append(shlex.join(words))
    return sorted(set(found))


COMMAND_LINES = _readme_commands()


def test_the_readme_shows_every_command():
    shown = {_glowtrain_calls(shlex.split(line))[0] for line in COMMAND_LINES}
    assert shown == set(COMMANDS.commands), set(COMMANDS.commands) ^ shown


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_each_readme_command_parses_with_real_options_configs_and_keys(line):
    name, *args = _glowtrain_calls(shlex.split(line))
    command = COMMANDS.commands[name]
    try:
        params = command.make_context(name, list(args)).params
    except Exception as e:  # click's usage errors (typer may carry its own copy of click)
        if not hasattr(e, "format_message"):
            raise
        pytest.fail(f"{line}: {e.format_message()}")
    config = params.get("config")
    if config is not None:
        assert (ROOT / config).is_file(), line
    sets = params.get("set_") or ()
    if config is not None or sets:
        load_config(ROOT / config if config else None, sets)  # a UserError names the bad key or value


def test_every_set_key_the_readme_names_is_a_config_key():
    named = set(re.findall(r"--set ([a-z_]+\.[a-z_0-9]+)=", README)) - NOT_KEYS
    assert named and not named - set(dotted_keys()), named - set(dotted_keys())
    assert not NOT_KEYS & set(dotted_keys())
