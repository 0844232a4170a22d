"""Compliance: the scim2-cli checker passes against the broker every check it passes against home."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.scim_support import Broker, Home, start_broker

pytestmark = pytest.mark.slow


@pytest.fixture
async def broker(db_url: str, home: Home) -> AsyncIterator[Broker]:
    async for running in start_broker(db_url, home, {"D1": {}}):
        yield running


def _scim2() -> str:
    beside = Path(sys.executable).parent / "scim2"
    found = str(beside) if beside.exists() else shutil.which("scim2")
    assert found, "the scim2 command (package scim2-cli) is not installed: pip install '.[test]'"
    return found


async def run_checker(url: str, token: str) -> tuple[Counter[str], str]:
    """How many times each check succeeds against ``url``, and the checker's whole output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIM_CLI")}
    process = await asyncio.create_subprocess_exec(
        _scim2(),
        "-u",
        url,
        "-h",
        f"Authorization: Bearer {token}",
        "test",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    text = out.decode()
    passed = Counter(
        line.split(" ", 1)[1].strip() for line in text.splitlines() if line.startswith("SUCCESS ")
    )
    return passed, text


async def test_the_broker_passes_every_check_the_home_passes(broker: Broker, home: Home) -> None:
    at_home, home_output = await run_checker(home.url, home.token)
    assert at_home.total() > 100, home_output  # the checker really ran against home
    through_broker, broker_output = await run_checker(broker.base, broker.tokens["D1"])
    missing = sorted((at_home - through_broker).elements())
    assert not missing, (
        f"checks passing at home but not through the broker: {missing}\n{broker_output}"
    )
