"""Several serving processes: the 100-user page through `broker serve --workers N` for two values
of N, measured in turns in one run, with what every process on the machine spent per request.

Two brokers run side by side, each with its own embedded PostgreSQL, in front of one home (the
fast home of ``bench/servers.py``); wrk loads one broker at a time, the order reversed every other
round, so a change in the machine's speed falls on both alike. Each round gives the ratio of the
two throughputs; the run reports the median ratio.

With every process's CPU per request (the broker's processes, the home, wrk) the run also gives
the ceiling this machine sets on the ratio: N processes cannot serve more than the cores hold,
shared with the home and wrk: ``ceiling = cores / (broker + home + wrk CPU per request, as
measured with N processes) / (requests/s of the first)``, each round's own figures.

    python bench/workers.py [--compare 1 2] [--duration 5] [--connections 8] [--rounds 5]
                            [--home plain|aiohttp] [--scoped]

Needs wrk (Debian: apt-get install wrk) and the broker installed (pip install .).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from run import (
    BROKER,
    HOMES,
    SCOPED_DOMAIN,
    domain_auth,
    free_port,
    home_server,
    process,
    tree_cpu,
    tree_cpus,
    wait_for,
    wrk,
)


@dataclass
class Broker:
    workers: str
    url: str
    """The 100-user page: ``{base}/Users``."""
    headers: dict[str, str]
    pid: int


@dataclass
class Turn:
    rps: float
    broker_us: float
    """CPU per request of the broker's processes (all of them)."""
    home_us: float
    wrk_us: float
    busiest: float
    """The share of the broker's CPU its busiest process used (1 / N: evenly spread)."""


def children_cpu() -> float:
    """CPU seconds of this script's finished children (wrk runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def broker(workers: str, home_url: str, work: Path, *, scoped: bool) -> Iterator[Broker]:
    """``broker serve --workers N`` on a free port with its own data directory, a domain (with
    a scope and a read list if ``scoped``) and its token."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_DATA_DIR=str(work / f"data-{workers}"),
        BROKER_SERVER__PORT=str(port),
        BROKER_SERVER__ADMIN_PORT=str(free_port()),
        BROKER_HOME__SCIM_URL=f"{home_url}/v2",
        BROKER_DATABASE__POOL_MAX_SIZE="10",
    )
    with process(
        [*BROKER, "serve", "--workers", workers], env=env, log=work / f"broker-{workers}.log"
    ) as proc:
        wait_for(f"http://127.0.0.1:{port}/readyz")
        headers = domain_auth(env, "D1", *(SCOPED_DOMAIN if scoped else ()))
        url = f"http://127.0.0.1:{port}/scim/v2/Users"
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as answer:
            json.loads(answer.read())  # the page answers before it is measured
        yield Broker(workers, url, headers, proc.pid)


def measure(target: Broker, home_pid: int, args: argparse.Namespace) -> Turn:
    wrk(target.url, duration=2, connections=args.connections, headers=target.headers)  # warm-up
    before = tree_cpus(target.pid)
    home_before, wrk_before = tree_cpu(home_pid), children_cpu()
    r = wrk(
        target.url, duration=args.duration, connections=args.connections, headers=target.headers
    )
    after = tree_cpus(target.pid)
    count = max(r.requests, 1)
    spent = {pid: used - before.get(pid, 0.0) for pid, used in after.items()}
    total = sum(spent.values())
    return Turn(
        rps=r.rps,
        broker_us=total / count * 1e6,
        home_us=(tree_cpu(home_pid) - home_before) / count * 1e6,
        wrk_us=(children_cpu() - wrk_before) / count * 1e6,
        busiest=max(spent.values()) / total if total else float("nan"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compare", nargs=2, default=["1", "2"], metavar="N")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--home", choices=HOMES, default="plain", help="the fast home's server")
    parser.add_argument(
        "--scoped", action="store_true", help="the page of a domain with a scope and a read list"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 1:
        print(f"bench: --rounds is at least 1, not {args.rounds}", file=sys.stderr)
        return 2
    one, many = args.compare
    if one == many or not all(n == "auto" or (n.isdigit() and int(n) > 0) for n in (one, many)):
        print(
            f"bench: --compare takes two different process counts (a number or auto), not "
            f"{one} and {many}",
            file=sys.stderr,
        )
        return 2
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="broker-bench-workers-"))
    home_port = free_port()
    home_url = f"http://127.0.0.1:{home_port}"
    load = os.getloadavg()[0]
    turns: dict[str, list[Turn]] = {n: [] for n in args.compare}
    with ExitStack() as stack:
        home = stack.enter_context(
            process(home_server(args.home, home_port), log=work / "home.log")
        )
        wait_for(f"{home_url}/v2/Users")
        brokers = [
            stack.enter_context(broker(n, home_url, work, scoped=args.scoped)) for n in args.compare
        ]
        for turn in range(args.rounds):
            for target in brokers[:: -1 if turn % 2 else 1]:
                t = measure(target, home.pid, args)
                turns[target.workers].append(t)
                print(
                    f"bench: round {turn + 1} --workers {target.workers}: {t.rps:6.0f} req/s  "
                    f"CPU us/req broker {t.broker_us:5.0f} home {t.home_us:4.0f} "
                    f"wrk {t.wrk_us:4.0f}  busiest process {t.busiest:.0%} of the broker's",
                    file=sys.stderr,
                )
    shutil.rmtree(work, ignore_errors=True)
    print(render(turns, args, load))
    return 0


def render(turns: dict[str, list[Turn]], args: argparse.Namespace, load: float) -> str:
    med = statistics.median
    one, many = args.compare
    cores = os.cpu_count() or 1
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} cores, load "
        f"average {load:.2f} before, home: {args.home}, "
        f"{'a domain with a scope and a read list' if args.scoped else 'a plain domain'}, "
        f"wrk -t1 -c{args.connections} -d{args.duration}s, "
        f"{args.rounds} rounds in turns (medians).",
        "",
        "| broker | page req/s | CPU us/req: broker | home | wrk | busiest process |",
        "|---|---|---|---|---|---|",
    ]
    for n, measured in turns.items():
        lines.append(
            f"| `--workers {n}` | {med(t.rps for t in measured):.0f} "
            f"| {med(t.broker_us for t in measured):.0f} | {med(t.home_us for t in measured):.0f} "
            f"| {med(t.wrk_us for t in measured):.0f} | {med(t.busiest for t in measured):.0%} |"
        )
    ratios = [b.rps / a.rps for a, b in zip(turns[one], turns[many], strict=True)]
    ceiling = med(
        cores * 1e6 / (b.broker_us + b.home_us + b.wrk_us) / a.rps
        for a, b in zip(turns[one], turns[many], strict=True)
    )
    lines += [
        "",
        f"`--workers {many}` / `--workers {one}`: **{med(ratios):.2f}** (rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"); the ceiling the cores set on it (all {cores} busy with the broker, home and wrk): "
        f"{ceiling:.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
