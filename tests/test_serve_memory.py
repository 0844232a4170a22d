"""``broker serve`` settles its memory once started (issue 15): what the application holds for
its lifetime is frozen out of the cyclic collector's sight, and the first generation collects
after many more allocations, so a page's thousands of short-lived objects do not set off full
collections on every request."""

from __future__ import annotations

import gc

from aiohttp import web

from broker.cli.serve import GC_THRESHOLDS, settle_memory


async def test_serving_freezes_what_the_process_holds_and_raises_the_first_threshold() -> None:
    before = gc.get_threshold()
    held = [object() for _ in range(3)], {"a": [1]}  # something long-lived the app holds
    try:
        await settle_memory(web.Application())
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 10_000
        assert held  # still there: freezing only hides it from the collector
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
