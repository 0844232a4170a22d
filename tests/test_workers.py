"""``broker serve --workers N``: processes sharing the domain-facing port, caches kept true across
them, and a port in use named as such (issue 15)."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scim_support import new_user, scim_server, unique
from tests.test_serve import Served, _data_dir, alive, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield from _data_dir(tmp_path)


def _children(pid: int) -> list[tuple[int, str]]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def _call(url: str, token: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """One request on a connection of its own (so the kernel may pick either process)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_two_processes_share_the_port_and_a_merge_is_seen_by_both_at_once(
    data_dir: Path, tmp_path: Path
) -> None:
    home_dir = tmp_path / "home"
    home_dir.mkdir()
    with scim_server(home_dir) as home:
        admin_port = free_port()
        served = Served(
            data_dir,
            "--workers",
            "2",
            extra_env={
                "BROKER_HOME__SCIM_URL": home.url,
                "BROKER_HOME__TOKEN": home.token,
                "BROKER_HOME__ID_PATTERN": "[0-9a-f]{32}",
                "BROKER_SERVER__ADMIN_PORT": str(admin_port),
            },
        )
        try:
            served.wait_ready()
            deadline = time.monotonic() + 60
            while not any("--secondary" in c for _, c in _children(served.process.pid)):
                assert time.monotonic() < deadline, served.output
                time.sleep(0.2)
            assert "ready, 2 processes" in served.output
            for args in (("domain", "add", "D"), ("domain", "add", "H", "--home")):
                assert served.cli(*args).returncode == 0
            token = served.cli("token", "issue", "D").stdout.strip()
            operator = served.cli("token", "issue", "H", "--scopes", "admin").stdout.strip()
            names = [unique("w"), unique("w")]
            internal = [home.call("POST", "/Users", new_user(n))[1]["id"] for n in names]
            scim = f"{served.url}/scim/v2"
            ids = []
            for name in names:
                status, listed = _call(f"{scim}/Users?filter=userName%20eq%20%22{name}%22", token)
                assert status == 200, listed
                ids.append(listed["Resources"][0]["id"])
            # Warm both processes' caches: every read on a connection of its own.
            for _ in range(30):
                for external in ids:
                    assert _call(f"{scim}/Users/{external}", token)[1]["id"] == external
            merge = {"survivor": internal[0], "losers": [internal[1]], "idempotency_key": unique()}
            status, body = _call(
                f"http://127.0.0.1:{admin_port}/admin/merges", operator, "POST", merge
            )
            assert status == 202, body
            # At once, in every process: the loser's ID is an alias of the survivor.
            for _ in range(30):
                status, body = _call(f"{scim}/Users/{ids[1]}", token)
                assert status == 200 and body["id"] == ids[0], body
            children = [pid for pid, _ in _children(served.process.pid)]
        finally:
            assert served.terminate() == 0, served.output
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), "a process of the broker outlived it"


def test_a_port_in_use_is_one_line_naming_the_port(data_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        served = Served(data_dir, "--port", str(port))
        code = served.process.wait(timeout=120)
    assert code == 2, served.output
    assert f"cannot listen on 127.0.0.1:{port}" in served.output
    assert "PostgreSQL could not start" not in served.output
    assert "Traceback" not in served.output


def test_an_admin_port_in_use_is_one_line_naming_that_port_and_its_setting(
    data_dir: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        admin_port = holder.getsockname()[1]
        served = Served(data_dir, extra_env={"BROKER_SERVER__ADMIN_PORT": str(admin_port)})
        code = served.process.wait(timeout=120)
    assert code == 2, served.output
    assert f"cannot listen on 127.0.0.1:{admin_port}" in served.output
    assert "[server] admin_port (BROKER_SERVER__ADMIN_PORT)" in served.output
    assert f":{served.port}:" not in served.output  # not the domain-facing port it could bind
    assert "Traceback" not in served.output


def test_workers_must_be_a_number_or_auto(data_dir: Path) -> None:
    served = Served(data_dir, "--workers", "zero")
    assert served.process.wait(timeout=60) == 1
    assert "--workers 'zero'" in served.output
    assert os.cpu_count() is not None
