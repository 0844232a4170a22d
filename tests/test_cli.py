"""The ``broker`` command's package: what it loads, how it parses, what it prints where."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker.cli.operations import moves
from broker.cli.parser import build_parser
from broker.errors import BrokerError
from broker.output import say, table

LOADED = (
    "import sys\n"
    "from broker.cli import main\n"
    "try:\n"
    "    main({argv!r})\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(sorted(m for m in sys.modules if m == 'broker.demo' or m.startswith('scim2_server')))\n"
)


@pytest.mark.parametrize(
    "argv", [["--help"], ["demo", "--help"], ["token", "issue"], ["split", "--help"]]
)
def test_no_command_but_demo_itself_loads_the_demo(argv: list[str]) -> None:
    # broker/demo.py (and what it runs) is loaded when `broker demo` runs, never to parse.
    result = subprocess.run(
        [sys.executable, "-c", LOADED.format(argv=argv)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_the_commands_are_listed_in_their_usual_order() -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if a.dest == "command")
    assert list(commands.choices or ()) == [
        "demo",
        "serve",
        "migrate",
        "domain",
        "token",
        "deliveries",
        "mappings",
        "merge",
        "split",
        "operations",
        "provision",
        "reconcile",
        "sync",
        "events",
        "keys",
        "history",
        "audit",
        "db",
    ]


def test_merge_and_split_get_a_random_idempotency_key_unless_given() -> None:
    args = build_parser().parse_args(["merge", "a", "b"])
    assert args.idempotency_key is None  # main() draws a UUID for it
    args = build_parser().parse_args(["split", "a", "b", "--idempotency-key", "k"])
    assert args.idempotency_key == "k"


def test_a_move_goes_to_the_first_new_entity_unless_one_is_named() -> None:
    assert moves(["n1", "n2"], ["P1:x", "n2=P2:y:z"]) == {
        "n1": [("P1", "x")],
        "n2": [("P2", "y:z")],
    }


@pytest.mark.parametrize("spec", ["P1", "P1:", ":x", "n3=P1:x", "n1="])
def test_a_malformed_move_says_how_to_write_one(spec: str) -> None:
    with pytest.raises(BrokerError) as caught:
        moves(["n1", "n2"], [spec])
    assert caught.value.status == 400
    assert f"--move {spec}: write DOMAIN:EXTERNAL_ID" in caught.value.detail


def test_messages_go_to_stderr_and_the_demo_narration_to_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    say("progress")
    say("narration", stdout=True)
    say(stdout=True)
    out, err = capsys.readouterr()
    assert (out, err) == ("narration\n\n", "progress\n")


def test_tables_are_drawn_as_seed_002_draws_the_mapping_table() -> None:
    assert table(("a", "bb"), [("xyz", "1")]) == "\n".join(
        ["| a   | bb |", "|-----|----|", "| xyz | 1  |"]
    )
