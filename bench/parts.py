"""Where a page request's CPU goes inside the serving process (issue 15): the broker and the
parse-only proxy run with a CPU timer (``time.thread_time_ns``) around each synchronous part of
the page path, so that the parts and the rest (aiohttp's server and client, the kernel's socket
work, the middleware, freeing the page) are measured in the very process and load that
``bench/run.py`` measures, not in another process on a machine in another state.

    python bench/parts.py broker serve [ARGS]      # ``broker serve``, the parts timed
    python bench/parts.py parse PORT HOME_URL      # bench/servers.py's parse-only proxy, timed

The parts: ``loads`` (home's answer parsed, ``Answer.json``), ``walk`` (the known walk,
``translate_known``), ``dumps`` (the answer serialised in ``Proxy.respond``), ``guard`` (the leak
guard's check; it awaits nothing while the mapping cache answers), ``gc`` (collections). On
SIGUSR1 the process writes its totals (nanoseconds and calls per part, and its process CPU) as
JSON to ``$BENCH_PARTS_DIR/parts.PID.json``; ``bench/run.py --parts`` reads them before and after
each measurement. The timers cost about a microsecond a request.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

_TOTALS: dict[str, list[int]] = {}
_clock = time.thread_time_ns
_COLLECTING = [0]
"""Nanoseconds of collections so far: a collection set off inside a timed part (by its
allocations) counts as ``gc``, not as that part."""


def _add(part: str, nanoseconds: int) -> None:
    held = _TOTALS.setdefault(part, [0, 0])
    held[0] += nanoseconds
    held[1] += 1


def timed(part: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with its CPU time counted as ``part``."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        start, collected = _clock(), _COLLECTING[0]
        try:
            return func(*args, **kwargs)
        finally:
            _add(part, _clock() - start - (_COLLECTING[0] - collected))

    return run


def timed_async(part: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """An async ``func`` with its CPU time counted as ``part`` (only right for one that does not
    suspend: time spent in other tasks while it waits would count too)."""

    @functools.wraps(func)
    async def run(*args: Any, **kwargs: Any) -> Any:
        start, collected = _clock(), _COLLECTING[0]
        try:
            return await func(*args, **kwargs)
        finally:
            _add(part, _clock() - start - (_COLLECTING[0] - collected))

    return run


class _TimedJson:
    """orjson as the timed module sees it: ``loads`` and ``dumps`` counted."""

    JSONDecodeError = orjson.JSONDecodeError

    def __init__(self, *, loads: str | None, dumps: str | None) -> None:
        self.loads = timed(loads, orjson.loads) if loads else orjson.loads
        self.dumps = timed(dumps, orjson.dumps) if dumps else orjson.dumps


def _count_collections() -> None:
    started: list[int] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [_clock()]
        elif started:
            spent = _clock() - started[0]
            _COLLECTING[0] += spent
            _add("gc", spent)

    gc.callbacks.append(callback)


def _write_on_signal() -> None:
    folder = Path(os.environ.get("BENCH_PARTS_DIR", "."))

    def write(*_: object) -> None:
        totals = {part: list(held) for part, held in _TOTALS.items()}
        totals["process"] = [time.process_time_ns(), 0]
        target = folder / f"parts.{os.getpid()}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(totals))
        temporary.replace(target)

    signal.signal(signal.SIGUSR1, write)


def read_parts(folder: Path, pid: int, timeout: float = 5.0) -> dict[str, list[int]]:
    """Ask process ``pid`` for its totals and read them (for ``bench/run.py --parts``)."""
    target = folder / f"parts.{pid}.json"
    target.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.exists():
            return dict(json.loads(target.read_text()))
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} wrote no totals to {target}")


def serve_broker(argv: list[str]) -> int:
    import broker.http
    import broker.mapping.guard
    import broker.proxy.handlers
    from broker.cli import main

    broker.http.Answer.json = timed("loads", broker.http.Answer.json)  # type: ignore[method-assign]
    handlers: Any = broker.proxy.handlers
    handlers.translate_known = timed("walk", handlers.translate_known)
    handlers.orjson = _TimedJson(loads=None, dumps="dumps")
    guard: Any = broker.mapping.guard.LeakGuard
    guard.check = timed_async("guard", guard.check)
    _count_collections()
    _write_on_signal()
    return main(argv)


def parse(port: int, home_url: str) -> None:
    import servers  # bench/ is on the path when this script runs
    from aiohttp import web

    module: Any = servers
    module.orjson = _TimedJson(loads="loads", dumps="dumps")
    _count_collections()
    _write_on_signal()
    application = servers.proxy_app(home_url, parse=True)
    web.run_app(application, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "broker":
        sys.exit(serve_broker(sys.argv[2:]))
    if len(sys.argv) == 4 and sys.argv[1] == "parse":
        parse(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    print(__doc__, file=sys.stderr)
    sys.exit(2)
