"""``broker demo`` as a person runs it: no set-up, one command, seed 002's two stories.

It starts real processes (embedded PostgreSQL, two scim2-server processes) and the broker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HEADER = re.compile(
    r"^\s*\| Internal Entity ID\s+\| External Domain ID\s+\| External Entity ID\s+"
    r"\| Primary flag\s+\| state\s+\|$",
    re.MULTILINE,
)
ROW = re.compile(
    r"^\s*\| ([0-9a-f]{32}) \| (P[12])\s+\| (\S+)\s+\| (true|false)\s+\| ([a-z_]+)\s+\|$",
    re.MULTILINE,
)
STEP = re.compile(r"^\[([ab]\.\d)\] ", re.MULTILINE)

Row = tuple[str, str, str, str, str]


def steps(output: str) -> dict[str, str]:
    """The output of each step (``a.1`` ... ``b.3``), up to the next step or heading."""
    marks = list(STEP.finditer(output))
    found = {}
    for here, after in zip(marks, [*marks[1:], None], strict=True):
        end = after.start() if after else output.index("Check: no internal ID")
        found[here.group(1)] = output[here.start() : end]
    return found


def rows(text: str) -> list[Row]:
    return [(m[1], m[2], m[3], m[4], m[5]) for m in ROW.finditer(text)]


def internal_id(output: str, user_name: str) -> str:
    found = re.search(
        rf"POST /Users '{re.escape(user_name)}'.* -> internal ID ([0-9a-f]{{32}})", output
    )
    assert found, f"no internal ID shown for {user_name}"
    return found.group(1)


def test_the_demo_walks_through_the_false_positive_and_the_false_negative() -> None:
    # The demo's own temporary directory is left where it goes (not under pytest's, whose
    # permissions other pytest sessions reset: embedded PostgreSQL, run as root, needs to traverse it).
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert HEADER.search(out), out
    by_step = steps(out)
    assert list(by_step) == ["a.1", "a.2", "a.3", "b.1", "b.2", "b.3"], list(by_step)

    john, other = internal_id(out, "john.smith"), internal_id(out, "john.smith.2")
    jsmith, johns = internal_id(out, "jsmith"), internal_id(out, "johns")

    # a: the split-off is absent from the table (and P2 does not know it) until it is needed.
    assert {(r[0], r[1]) for r in rows(by_step["a.1"])} == {(john, "P1"), (john, "P2")}
    split = rows(by_step["a.2"])
    assert {(r[0], r[1], r[3], r[4]) for r in split} == {
        (john, "P1", "true", "active"),
        (john, "P2", "true", "active"),
    }
    assert "john.smith.2" not in by_step["a.2"].split("What P2 holds", 1)[1]
    provisioned = rows(by_step["a.3"])
    assert {(r[0], r[1], r[3], r[4]) for r in provisioned} == {
        (john, "P1", "true", "active"),
        (john, "P2", "true", "active"),
        (other, "P1", "true", "active"),
        (other, "P2", "true", "active"),
    }
    assert len({r[2] for r in provisioned}) == 4, "each peer gave each entity an ID of its own"

    # b: four rows; after the merge, JohnS's rows are aliases awaiting deletion; then gone.
    before = rows(by_step["b.1"])
    assert {(r[0], r[1]) for r in before} == {
        (jsmith, "P1"),
        (jsmith, "P2"),
        (johns, "P1"),
        (johns, "P2"),
    }
    johns_ids = {r[1]: r[2] for r in before if r[0] == johns}
    merged = rows(by_step["b.2"])
    for peer, alias in johns_ids.items():
        assert (jsmith, peer, alias, "false", "deletion_required") in merged, merged
    assert all(r[0] == jsmith for r in merged)
    assert "propagating" in by_step["b.2"]
    final = rows(by_step["b.3"])
    assert {(r[0], r[1], r[3], r[4]) for r in final} == {
        (jsmith, "P1", "true", "active"),
        (jsmith, "P2", "true", "active"),
    }
    assert not set(johns_ids.values()) & {r[2] for r in final}
    peers_after = by_step["b.3"].split("What P1 holds", 1)[1]
    assert "| johns " not in peers_after and "| jsmith " in peers_after
    assert '"state": "done"' in by_step["b.3"]

    assert "OK: none of the" in out and "FAILED" not in out
    assert "Everything the demo started is stopped." in out
    directory = re.search(r"Starting the federation \(from nothing, in (.+)\)", out)
    assert directory and not Path(directory.group(1)).exists(), "the demo's directory is removed"
