"""Where a page request's CPU goes inside the serving process (issue 15): the broker and the
parse-only proxy run with a CPU timer (``time.thread_time_ns``) around each synchronous part of
the page path, so that the parts and the rest (aiohttp's server and client, the kernel's socket
work, the middleware, freeing the page) are measured in the very process and load that
``bench/run.py`` measures, not in another process on a machine in another state.

    python bench/parts.py broker serve [ARGS]      # ``broker serve``, the parts timed
    python bench/parts.py parse PORT HOME_URL      # bench/servers.py's parse-only proxy, timed

The parts: ``loads`` (home's answer parsed, ``Answer.json``), ``walk`` (the known walk,
``translate_known``), ``dumps`` (the answer serialised in ``Proxy.respond``), ``guard`` (the leak
guard's check; it awaits nothing while the mapping cache answers), ``home`` (the call to home in
aiohttp's client, its release included: the broker's ``HomeClient._exchange``; the proxy's
request, read and release), ``app`` (the whole handler with its middleware, the parts
above included), ``gc`` (collections, wherever they ran: not counted in the part they ran in).
An async part is timed step by step (:class:`Steps`): the CPU of other tasks that run while it
waits is not counted. On SIGUSR1 the process writes its totals (nanoseconds and calls per part,
and its process CPU) as JSON to ``$BENCH_PARTS_DIR/parts.PID.json``; ``bench/run.py --parts``
reads them before and after each measurement. The timers cost a few microseconds a request
(counted in ``app``).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

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


class Steps:
    """An awaitable that drives ``coroutine`` and counts the CPU of each of its steps as
    ``part``, so that the work of other tasks while it waits is not counted."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any], part: str) -> None:
        self.coroutine, self.part = coroutine, part

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, value, error = self.coroutine, None, None
        while True:
            start, collected = _clock(), _COLLECTING[0]
            try:
                sent = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration as done:
                return done.value
            finally:
                _add(self.part, _clock() - start - (_COLLECTING[0] - collected))
            try:
                value, error = (yield sent), None
            except BaseException as exc:  # thrown in by the event loop (a cancellation): passed on
                value, error = None, exc


def timed_steps(part: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """An async ``func`` whose steps count as ``part``."""

    @functools.wraps(func)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await Steps(func(*args, **kwargs), part)

    return run


@web.middleware
async def _handler_time(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost: the whole handler and its middleware, step by step, as ``app``."""
    response: web.StreamResponse = await Steps(handler(request), "app")
    return response


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
    import broker.cli.serve
    import broker.home
    import broker.http
    import broker.mapping.guard
    import broker.proxy.handlers
    from broker.cli import main

    broker.http.Answer.json = timed("loads", broker.http.Answer.json)  # type: ignore[method-assign]
    home: Any = broker.home.HomeClient
    home._exchange = timed_steps("home", home._exchange)
    serve: Any = broker.cli.serve
    create_app = serve.create_app

    def timed_app(config: Any) -> web.Application:
        application: web.Application = create_app(config)
        application.middlewares.insert(0, _handler_time)
        return application

    serve.create_app = timed_app
    handlers: Any = broker.proxy.handlers
    handlers.translate_known = timed("walk", handlers.translate_known)
    handlers.orjson = _TimedJson(loads=None, dumps="dumps")
    guard: Any = broker.mapping.guard.LeakGuard
    guard.check = timed_async("guard", guard.check)
    _count_collections()
    _write_on_signal()
    return main(argv)


def parse(port: int, home_url: str) -> None:
    import aiohttp
    import servers  # bench/ is on the path when this script runs

    module: Any = servers
    module.orjson = _TimedJson(loads="loads", dumps="dumps")
    session: Any = aiohttp.ClientSession
    session._request = timed_steps("home", session._request)
    response: Any = aiohttp.ClientResponse
    response.read = timed_steps("home", response.read)
    response.__aexit__ = timed_steps("home", response.__aexit__)  # the release, as the broker's
    _count_collections()
    _write_on_signal()
    application = servers.proxy_app(home_url, parse=True)
    application.middlewares.insert(0, _handler_time)
    web.run_app(application, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "broker":
        sys.exit(serve_broker(sys.argv[2:]))
    if len(sys.argv) == 4 and sys.argv[1] == "parse":
        parse(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    print(__doc__, file=sys.stderr)
    sys.exit(2)
