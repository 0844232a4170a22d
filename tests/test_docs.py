"""The README and docs/ name only what exists: every command and option of the README's command
table is in the real parser (and every command of the parser is in the table), every
``[section] key``, TOML key and ``BROKER_SECTION__KEY`` variable the docs name is in the
configuration, and every relative link points at a file of the repository."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.cli.parser import build_parser
from broker.config import ENV_RESERVED, ENV_SHORTCUTS, Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])

# Options no person types: the process `broker serve --workers N` starts beside itself.
HIDDEN_OPTIONS = {"--help", "--secondary"}


@dataclass(frozen=True)
class Usage:
    """One ``broker ...`` synopsis of the command table: the command's words, then the rest."""

    text: str
    words: tuple[str, ...]


def command_table(markdown: str) -> list[str]:
    """The first cell of each row of the README's ``## Commands`` table."""
    section = markdown.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    cells = []
    for line in section.splitlines():
        if line.startswith("| `broker"):
            # A cell ends at the first '|' that is not escaped as '\|'.
            cells.append(re.split(r"(?<!\\)\|", line)[1].strip())
    return cells


def usages(cell: str) -> list[Usage]:
    """Each backticked ``broker ...`` synopsis of a cell (a cell may hold several)."""
    found = []
    for text in re.findall(r"`(broker [^`]*)`", cell):
        text = text.replace("\\|", "|")
        words = tuple(
            alternative
            for word in re.split(r"[\s\[\]]+", text)
            if word
            # `--all|--since T`: each option on its own.
            for alternative in (word.split("|") if word.startswith("--") else [word])
        )
        found.append(Usage(text, words[1:]))
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def resolve(usage: Usage) -> tuple[list[argparse.ArgumentParser], list[str], list[str]]:
    """The parsers ``usage`` names (``retry|discard`` names two), the words after the command,
    and the problems found on the way."""
    parsers, path, problems = [build_parser()], ["broker"], []
    words = list(usage.words)
    while words and subcommands(parsers[0]):
        word = words.pop(0)
        found = []
        for alternative in word.split("|"):
            for parser in parsers:
                sub = subcommands(parser).get(alternative)
                if sub is None:
                    problems.append(f"`{' '.join(path)} {alternative}` is not a command")
                else:
                    found.append(sub)
        if not found:
            return [], words, problems
        parsers, path = found, [*path, word]
    return parsers, words, problems


def check_options(
    usage: Usage, parsers: list[argparse.ArgumentParser], rest: list[str]
) -> list[str]:
    """Every ``--option`` of the synopsis exists, and a literal value given it is a choice."""
    problems = []
    for index, word in enumerate(rest):
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        for parser in parsers:
            action = options(parser).get(name)
            if action is None:
                problems.append(f"{usage.text!r}: {parser.prog} has no option {name}")
                continue
            value = rest[index + 1] if index + 1 < len(rest) else ""
            if action.choices is None or not re.fullmatch(r"[a-z_][a-z_|-]*", value):
                continue
            for choice in value.split("|"):
                if choice not in action.choices:
                    problems.append(f"{usage.text!r}: {name} takes no value {choice!r}")
    return problems


def table_problems(markdown: str) -> tuple[list[str], set[str], dict[str, set[str]]]:
    """What in the table does not exist; the commands and the options it names."""
    problems: list[str] = []
    named: set[str] = set()
    named_options: dict[str, set[str]] = {}
    for cell in command_table(markdown):
        for usage in usages(cell):
            parsers, rest, found = resolve(usage)
            like_add = re.search(r"\[any option of add(?: except (--[a-z-]+))?\]", usage.text)
            if like_add:
                # `domain update`: each of add's options (but the one excepted) is update's too.
                add = subcommands(subcommands(build_parser())["domain"])["add"]
                excepted = {"-h", like_add.group(1)}
                rest = [w for w in rest if w != like_add.group(1)]
                rest += sorted(set(options(add)) - HIDDEN_OPTIONS - excepted)
            problems += found
            problems += check_options(usage, parsers, rest)
            for parser in parsers:
                named.add(parser.prog)
                named_options.setdefault(parser.prog, set()).update(
                    w.split("=", 1)[0] for w in rest if w.startswith("--")
                )
    return problems, named, named_options


def all_commands(
    parser: argparse.ArgumentParser,
) -> list[argparse.ArgumentParser]:
    """Every command that runs (a parser without subcommands), depth first."""
    subs = subcommands(parser)
    if not subs:
        return [parser]
    return [leaf for sub in subs.values() for leaf in all_commands(sub)]


def test_every_command_and_option_of_the_table_exists() -> None:
    problems, named, _ = table_problems(README.read_text(encoding="utf-8"))
    assert named, "no `broker ...` found in the README's command table"
    assert not problems, "\n".join(problems)


def test_every_command_and_option_of_the_parser_is_in_the_table() -> None:
    _, named, named_options = table_problems(README.read_text(encoding="utf-8"))
    missing = []
    for command in all_commands(build_parser()):
        if command.prog not in named:
            missing.append(f"{command.prog} is not in the README's command table")
            continue
        for name in sorted(set(options(command)) - HIDDEN_OPTIONS):
            if name.startswith("--") and name not in named_options[command.prog]:
                missing.append(f"{command.prog} {name} is not in the README's command table")
    assert not missing, "\n".join(missing)


def test_the_global_options_exist() -> None:
    text = README.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("Global options:"))
    named = set(re.findall(r"`(--[a-z-]+)", line))
    real = {name for name in options(build_parser()) if name.startswith("--")}
    assert named == real - {"--help", "--version"}


def config_keys() -> dict[str, set[str]]:
    return {
        section: set(field.annotation.model_fields)  # type: ignore[union-attr]
        for section, field in Config.model_fields.items()
    }


def named_keys(markdown: str) -> list[tuple[str, str, str]]:
    """(section, key, where) for each ``[section] key`` of the prose, each key of a ```toml
    block (commented out or not) and each ``BROKER_SECTION__KEY`` variable."""
    found = []
    for section, key in re.findall(r"`?\[([a-z_]+)\]`?\s+`?([a-z_]+)", markdown):
        found.append((section, key, f"[{section}] {key}"))
    for block in re.findall(r"```toml\n(.*?)```", markdown, flags=re.S):
        section = ""
        for line in block.splitlines():
            header = re.match(r"\s*\[([a-z_]+)\]", line)
            if header:
                section = header.group(1)
                continue
            key = re.match(r"\s*#?\s*([a-z_]+)\s*=", line)
            if key:
                found.append((section, key.group(1), f"toml [{section}] {key.group(1)}"))
    for name in re.findall(r"\bBROKER_[A-Z_]+__[A-Z_]+\b", markdown):
        if name == "BROKER_SECTION__KEY" or name in ENV_RESERVED or name in ENV_SHORTCUTS:
            continue
        section, _, key = name.removeprefix("BROKER_").lower().partition("__")
        found.append((section, key, name))
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_the_docs_name_exists(path: Path) -> None:
    keys = config_keys()
    unknown = [
        where
        for section, key, where in named_keys(path.read_text(encoding="utf-8"))
        if key not in keys.get(section, set())
    ]
    assert not unknown, f"{path.name} names keys broker/config.py does not have: {unknown}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_points_into_the_repository(path: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(target)
    assert not broken, f"{path.name} links to what the repository does not hold: {broken}"


def test_seed_002_is_explained_where_first_named() -> None:
    text = README.read_text(encoding="utf-8")
    first = text.index("seed 002")
    around = text[max(0, first - 300) : first + 300]
    assert "IETF SCIM" in around and "2012" in around, around


# The checks above must be able to fail: each is shown a README that is wrong.
WRONG_TABLE = """
## Commands

| command | what it does |
|---|---|
| `broker domain ad DOMAIN` | a misspelt command |
| `broker serve [--prot P]` | a misspelt option |
| `broker deliveries list [--state deadd]` | a value that is no choice |
| `broker deliveries retry\\|dicsard ID...` | one alternative misspelt |

## Next
"""


def test_the_table_check_finds_what_does_not_exist() -> None:
    problems, _, _ = table_problems(WRONG_TABLE)
    text = "\n".join(problems)
    assert "`broker domain ad` is not a command" in text
    assert "has no option --prot" in text
    assert "takes no value 'deadd'" in text
    assert "`broker deliveries dicsard` is not a command" in text


def test_the_key_check_finds_what_does_not_exist() -> None:
    keys = config_keys()
    wrong = (
        "Set `[propagation] secret_key_envv` or BROKER_HOME__TOKEN_ENVV.\n"
        "```toml\n[events]\n# long_poll = 30\n```\n"
    )
    unknown = [w for s, k, w in named_keys(wrong) if k not in keys.get(s, set())]
    assert unknown == [
        "[propagation] secret_key_envv",
        "toml [events] long_poll",
        "BROKER_HOME__TOKEN_ENVV",
    ]
