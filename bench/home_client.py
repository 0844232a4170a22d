"""CPU per call to home (issue 15): the broker's own HTTP/1.1 client (``broker/origin.py``, through
``HomeClient``) against aiohttp's client (``broker.http.exchange``, what ``HomeClient`` used
before), the same GETs to the same home in one run.

    python bench/home_client.py [--calls 3000] [--rounds 5]

Home is ``bench/servers.py``'s, in a process of its own; the clients run one after the other in
this process, one call at a time, and their CPU (``time.process_time``: this process only, so
home's work is not counted) is divided by the calls. Both the one-user answer and the 100-user
page are measured, in rounds that alternate the clients; the medians are printed, and the
ratio of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from run import free_port, process, wait_for  # bench/ is on the path when this script runs
from servers import USERS

from broker.home import HomeClient
from broker.http import exchange

HERE = Path(__file__).parent


async def cpu_per_call(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(50):  # connections open, caches warm
        await call()
    start = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - start) / calls * 1e6


async def measure(base: str, calls: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    results: dict[tuple[str, str], list[float]] = {}
    paths = {"one user": f"/Users/{USERS[0]}", "100-user page": "/Users"}
    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=100)
        ) as session,
        HomeClient(base, "bench-token") as home,
    ):
        auth = {"Authorization": "Bearer bench-token"}
        for _ in range(rounds):
            for what, path in paths.items():

                async def by_aiohttp(path: str = path) -> object:
                    answer = await exchange(
                        session, "GET", base + path, auth=auth, limit=home.limit
                    )
                    return answer.json()

                async def by_origin(path: str = path) -> object:
                    return (await home.request("GET", path)).body

                for client, call in (("aiohttp", by_aiohttp), ("broker/origin.py", by_origin)):
                    results.setdefault((what, client), []).append(await cpu_per_call(call, calls))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    with process([sys.executable, str(HERE / "servers.py"), "home", str(port)]):
        wait_for(f"http://127.0.0.1:{port}/v2/Users")
        results = asyncio.run(measure(f"http://127.0.0.1:{port}/v2", args.calls, args.rounds))
    print("| answer | aiohttp's client, us of CPU per call | broker/origin.py | ratio |")
    print("|---|---|---|---|")
    for what in ("one user", "100-user page"):
        old = statistics.median(results[what, "aiohttp"])
        new = statistics.median(results[what, "broker/origin.py"])
        print(f"| {what} | {old:.0f} | {new:.0f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
