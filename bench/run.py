"""Proxy benchmark: the broker against a bare pass-through proxy and direct access, in one run.

Each server is a process of its own; the load generator is wrk, outside every Python process.
Results are ratios within the run, since this machine is shared and noisy.

    python bench/run.py [--duration 10] [--connections 8] [--latency-connections 1]
                        [--workers N] [--rounds N] [--parts] [--output docs/performance.md]

Each row also gives the server's CPU per request (user + system, from /proc, all its processes),
and the p50 of a second measurement with one connection: with wrk's closed loop of 8 connections,
a request waits behind the 7 others, so the first p50 is about 8 / throughput and the p50 "added"
there is the throughput gap seen from the client; one connection shows the time a request adds.
With ``--parts`` the broker and the parse-only proxy run through ``bench/parts.py``, and each row's
CPU per request is split into its parts (home's answer parsed, the walk, the guard, the answer
serialised, the call to home, the rest of the handler and its middleware, aiohttp's server outside
the handler, collections), measured in the servers under this very load.

With ``--rounds N`` every target is measured N times, in turns (the order reversed every other
round), so that a change in the machine's speed during the run falls on all of them alike: each
row gives the median of its N measurements, and each ratio the median of the N ratios taken
within one round.

Needs wrk (Debian: apt-get install wrk) and the broker installed (pip install .).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from parts import read_parts  # bench/ is on the path when this script runs
from servers import USERS

HERE = Path(__file__).parent
BROKER = [sys.executable, "-m", "broker.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HOMES = ("plain", "aiohttp")
"""The fast home of ``servers.py``: a plain asyncio protocol (the default), or the same in
aiohttp (the home of the runs before 2026-12-06 16:00, which cost 3 to 4 times as much CPU)."""


def home_server(kind: str, port: int) -> list[str]:
    """The command that runs the fast home of ``servers.py`` (``kind``: one of ``HOMES``)."""
    role = "home" if kind == "plain" else "home-aiohttp"
    return [sys.executable, str(HERE / "servers.py"), role, str(port)]


def wait_for(url: str, headers: dict[str, str] | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers or {}), timeout=2
            ):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


SCOPED_DOMAIN = (
    "--scope",
    "userName pr",
    "--read-attributes",
    "userName,displayName,emails,groups",
)
"""``broker domain add`` options of the domain with a scope and a read list: every check of the
request path in play."""


def domain_auth(env: dict[str, str], name: str, *options: str) -> dict[str, str]:
    """A domain added to the broker (``broker domain add NAME OPTIONS``): the header of a token
    issued to it."""
    subprocess.run(
        [*BROKER, "domain", "add", name, *options], env=env, check=True, capture_output=True
    )
    token = subprocess.run(
        [*BROKER, "token", "issue", name], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us: float = float("nan")
    """CPU (user + system) the server's processes used per request during the measurement."""
    parts_us: dict[str, float] | None = None
    """With ``--parts``: CPU per request of each part (bench/parts.py, :func:`per_request`)."""
    p50_one_ms: float = float("nan")
    """p50 with one connection (``--latency-connections``): the time a request takes when it
    does not wait behind others. With wrk's closed loop of N connections, a server that serves one
    request at a time holds each request about N times its service time (Little's law), so the
    p50 of the main measurement is the throughput seen from the other side, not the latency a
    request adds."""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpus(pid: int) -> dict[int, float]:
    """CPU seconds used so far by ``pid`` and every process under it (``broker serve
    --workers N`` forks its workers), by process: from /proc, read by the benchmark, outside
    the servers."""
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        try:
            found[current] = cpu_seconds(current)
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and every process under it, together."""
    return sum(tree_cpus(pid).values())


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, *, duration: int, connections: int, headers: dict[str, str]) -> Result:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, timeout=duration + 60
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Anchored: the Latency line's stdev column ("87.50%") must not be read as a percentile.
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return Result(rps, p50, p99, int(errors_match.group(1)) if errors_match else 0, count)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--home", choices=HOMES, default="plain", help="the fast home's server")
    parser.add_argument(
        "--workers", default="1", help="broker serve --workers (processes sharing the port)"
    )
    parser.add_argument(
        "--latency-connections",
        type=int,
        default=1,
        help="connections of the second measurement of each row, for the p50 a request sees "
        "when it does not queue behind the others (0: not measured)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every target this many times, in turns; medians are reported",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="split the CPU per request of the broker and the parse-only proxy into parts "
        "(bench/parts.py; --workers 1 only)",
    )
    parser.add_argument(
        "--output", type=Path, help="write the results table into this markdown file"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        print(f"bench: --rounds is at least 1, not {args.rounds}", file=sys.stderr)
        return 2
    if args.parts and args.workers != "1":
        print("bench: --parts measures one process: use it with --workers 1", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    home_port, proxy_port, parse_port, broker_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    home_url = f"http://127.0.0.1:{home_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_DATA_DIR=str(work / "data"),
        BROKER_SERVER__PORT=str(broker_port),
        # Not the default admin port: another broker on the machine may hold it.
        BROKER_SERVER__ADMIN_PORT=str(free_port()),
        BROKER_HOME__SCIM_URL=f"{home_url}/v2",
        BROKER_DATABASE__POOL_MAX_SIZE="10",
        BENCH_PARTS_DIR=str(work),
    )
    timed = [sys.executable, str(HERE / "parts.py")]
    parse_server = (
        [*timed, "parse"] if args.parts else [sys.executable, str(HERE / "servers.py"), "parse"]
    )
    broker_server = [*timed, "broker"] if args.parts else BROKER
    print(f"bench: servers in {work}", file=sys.stderr)
    with (
        process(home_server(args.home, home_port), log=work / "home.log") as home,
        process(
            [sys.executable, str(HERE / "servers.py"), "proxy", str(proxy_port), home_url],
            log=work / "proxy.log",
        ) as bare,
        process(
            [*parse_server, str(parse_port), home_url],
            env=env,
            log=work / "parse.log",
        ) as parse,
        process(
            [*broker_server, "serve", "--workers", args.workers],
            env=env,
            log=work / "broker.log",
        ) as broker,
    ):
        wait_for(f"{home_url}/v2/Users")
        wait_for(f"http://127.0.0.1:{proxy_port}/v2/Users")
        wait_for(f"http://127.0.0.1:{parse_port}/v2/Users")
        wait_for(f"http://127.0.0.1:{broker_port}/readyz")
        auth = domain_auth(env, "D1")
        # A domain with a scope and a read list: every check of the request path in play.
        scoped_auth = domain_auth(env, "S", *SCOPED_DOMAIN)
        broker_base = f"http://127.0.0.1:{broker_port}/scim/v2"
        with urllib.request.urlopen(
            urllib.request.Request(f"{broker_base}/Users", headers=auth)
        ) as r:
            first = json.loads(r.read())["Resources"][0]["id"]  # D1's ID for the first user
        with urllib.request.urlopen(
            urllib.request.Request(f"{broker_base}/Users", headers=scoped_auth)
        ) as r:
            scoped_first = json.loads(r.read())["Resources"][0]["id"]
        # Each target with the process whose CPU per request is counted (the home's own CPU
        # is not counted for the proxies; the broker's workers are counted with it).
        targets = {
            "direct": (f"{home_url}/v2", USERS[0], {}, home.pid),
            "bare proxy": (f"http://127.0.0.1:{proxy_port}/v2", USERS[0], {}, bare.pid),
            "parse-only proxy": (f"http://127.0.0.1:{parse_port}/v2", USERS[0], {}, parse.pid),
            "broker": (broker_base, first, auth, broker.pid),
            "broker, scope + read list": (broker_base, scoped_first, scoped_auth, broker.pid),
        }
        rounds: list[dict[tuple[str, str], Result]] = []
        for turn in range(args.rounds):
            results: dict[tuple[str, str], Result] = {}
            rounds.append(results)
            for case, path in (("GET one user", "/Users/{id}"), ("GET 100-user page", "/Users")):
                for name in list(targets)[:: -1 if turn % 2 else 1]:
                    base, user_id, headers, pid = targets[name]
                    url = base + path.format(id=user_id)
                    split = args.parts and name not in ("direct", "bare proxy")
                    r = measure(url, headers, pid, args, parts_dir=work if split else None)
                    results[case, name] = r
                    print(
                        f"bench: {case:18} {name:26} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
                        f"p99 {r.p99_ms:6.2f} ms  CPU {r.cpu_us:5.0f} us/req  "
                        f"p50 alone {r.p50_one_ms:6.2f} ms  errors {r.errors}",
                        file=sys.stderr,
                    )
                    if r.parts_us:
                        print(
                            "bench:   parts (us/req): "
                            + "  ".join(f"{k} {v:.0f}" for k, v in r.parts_us.items()),
                            file=sys.stderr,
                        )

    table = render(rounds, args)
    print(table)
    if args.output:
        write_section(args.output, table)
    shutil.rmtree(work, ignore_errors=True)
    return 0


PARTS = ("loads", "walk", "guard", "dumps", "home", "handler", "outside", "gc")


def measure(
    url: str,
    headers: dict[str, str],
    pid: int,
    args: argparse.Namespace,
    *,
    parts_dir: Path | None,
) -> Result:
    """One target measured: after a warm-up, wrk with ``--connections`` (with the server's CPU
    per request, split into parts with ``parts_dir``), then with ``--latency-connections``."""
    wrk(url, duration=2, connections=args.connections, headers=headers)  # warm-up
    parts_before = read_parts(parts_dir, pid) if parts_dir else {}
    before = tree_cpu(pid)
    r = wrk(url, duration=args.duration, connections=args.connections, headers=headers)
    r.cpu_us = (tree_cpu(pid) - before) / max(r.requests, 1) * 1e6
    if parts_dir:
        r.parts_us = per_request(parts_before, read_parts(parts_dir, pid), r.requests)
    if args.latency_connections:
        alone = wrk(
            url, duration=args.duration, connections=args.latency_connections, headers=headers
        )
        r.p50_one_ms = alone.p50_ms
        r.errors += alone.errors
    return r


def typical(measured: list[Result]) -> Result:
    """The median of one target's measurements, field by field (errors and requests summed)."""
    med = statistics.median
    parts = None
    if all(r.parts_us for r in measured):
        parts = {p: med(r.parts_us[p] for r in measured) for p in PARTS}  # type: ignore[index]
    return Result(
        rps=med(r.rps for r in measured),
        p50_ms=med(r.p50_ms for r in measured),
        p99_ms=med(r.p99_ms for r in measured),
        errors=sum(r.errors for r in measured),
        requests=sum(r.requests for r in measured),
        cpu_us=med(r.cpu_us for r in measured),
        parts_us=parts,
        p50_one_ms=med(r.p50_one_ms for r in measured),
    )


def per_request(
    before: dict[str, list[int]], after: dict[str, list[int]], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request of each part between two totals of bench/parts.py:
    ``handler``, the handler's and the middleware's CPU that no other part holds; ``outside``,
    the process's CPU outside the handler (aiohttp's server, the client's protocol, the event
    loop, the kernel's socket work) and outside collections."""
    count = max(requests, 1)

    def spent(part: str) -> float:
        return (after.get(part, [0, 0])[0] - before.get(part, [0, 0])[0]) / 1000 / count

    parts = {part: spent(part) for part in ("loads", "walk", "guard", "dumps", "home")}
    app, collections = spent("app"), spent("gc")
    parts["handler"] = app - sum(parts.values())
    parts["outside"] = spent("process") - app - collections
    parts["gc"] = collections
    return parts


def render_parts(results: dict[tuple[str, str], Result]) -> list[str]:
    """The table of --parts: each part's CPU per request, in the servers under load."""
    lines = [
        "",
        "| case | target | " + " | ".join(PARTS) + " | total |",
        "|---|---|" + "---|" * (len(PARTS) + 1),
    ]
    for (case, name), r in results.items():
        if r.parts_us:
            cells = " | ".join(f"{r.parts_us[p]:.0f}" for p in PARTS)
            lines.append(f"| {case} | {name} | {cells} | {sum(r.parts_us.values()):.0f} |")
    return lines


def render(rounds: list[dict[tuple[str, str], Result]], args: argparse.Namespace) -> str:
    """The tables: each target's median over the rounds, and each ratio's median over the
    ratios taken within one round."""
    results = {key: typical([r[key] for r in rounds]) for key in rounds[0]}
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"home: {args.home}, wrk -t1 -c{args.connections} -d{args.duration}s per row, "
        f"broker --workers {args.workers}"
        + (f", {args.rounds} rounds (medians)." if args.rounds > 1 else "."),
        "",
        f"| case | target | req/s | p50 ms | p99 ms | CPU us/req "
        f"| p50 ms, {args.latency_connections} connection(s) | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (case, name), r in results.items():
        lines.append(
            f"| {case} | {name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.cpu_us:.0f} | {_ms_or_dash(r.p50_one_ms)} | {r.errors} |"
        )
    lines += [
        "",
        "| case | domain | broker / bare proxy | broker / parse-only proxy "
        "| p50 added over bare | p50 added over parse-only "
        f"| the same, {args.latency_connections} connection(s) "
        "| CPU / req, broker / parse-only | parse-only / bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(c for c, _ in results):
        for label, name in (
            ("plain", "broker"),
            ("scope + read list", "broker, scope + read list"),
        ):
            within = [compare(r[case, name], r[case, "bare proxy"], r[case, "parse-only proxy"])
                      for r in rounds]  # fmt: skip
            bare_ratio, parse_ratio, over_bare, over_parse, alone, cpu, floor = (
                statistics.median(column) for column in zip(*within, strict=True)
            )
            lines.append(
                f"| {case} | {label} | {bare_ratio:.0%} | {parse_ratio:.0%} "
                f"| {over_bare:+.2f} ms | {over_parse:+.2f} ms | {_ms_or_dash(alone, '+')} "
                f"| {cpu:.2f} | {floor:.0%} |"
            )
    if args.parts:
        lines += render_parts(results)
    return "\n".join(lines)


def _ms_or_dash(value: float, sign: str = "") -> str:
    """Milliseconds, or "-" where not measured (``--latency-connections 0``)."""
    return "-" if math.isnan(value) else f"{value:{sign}.2f}" + (" ms" if sign else "")


def compare(broker: Result, bare: Result, parse: Result) -> tuple[float, ...]:
    """The broker against the two proxies measured in the same round: throughput ratios, p50
    added (both loads), CPU ratio, and the parse-only proxy's throughput against the bare one's."""
    return (
        broker.rps / bare.rps,
        broker.rps / parse.rps,
        broker.p50_ms - bare.p50_ms,
        broker.p50_ms - parse.p50_ms,
        broker.p50_one_ms - parse.p50_one_ms,
        broker.cpu_us / parse.cpu_us,
        parse.rps / bare.rps,
    )


def write_section(path: Path, table: str) -> None:
    start, end = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
