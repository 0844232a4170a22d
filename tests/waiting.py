"""Waiting on a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Only stops a test that hangs: no assertion depends on how long a wait takes, so a loaded
# machine (CI shares two cores) makes a test slower, never failing.
HANG = 120.0


async def until(check: Callable[[], T | Awaitable[T]], what: str, *, within: float = HANG) -> T:
    """Poll ``check`` (plain or async) until it answers something true, and return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        answer = check()
        value: T = await answer if inspect.isawaitable(answer) else answer  # type: ignore[assignment]
        if value:
            return value
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)
