"""``broker serve`` as an operator runs it: no configuration, no PostgreSQL installed, a data directory.

These start real processes: the broker, and the embedded PostgreSQL it runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.db import load_migrations

pytestmark = pytest.mark.slow

BROKER = [sys.executable, "-m", "broker.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    # The admin listener on a free port too: 8081 (its default) may be held on a shared machine.
    env.update(
        BROKER_DATA_DIR=str(data_dir),
        BROKER_SERVER__PORT=str(port),
        BROKER_SERVER__ADMIN_PORT=str(free_port()),
    )
    return env


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose embedded PostgreSQL is stopped afterwards, whatever failed."""
    directory = tmp_path / "broker-data"
    yield directory
    pid = postmaster_pid(directory)
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGQUIT)


class Served:
    def __init__(self, data_dir: Path, *args: str, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {**environment(data_dir, self.port), **(extra_env or {})}
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*BROKER, "serve", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> float:
        """Seconds until /readyz answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"broker serve exited {self.process.returncode}: {self.output}"
                )
            try:
                status, _ = get(self.url + "/readyz")
                if status == 200:
                    return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise AssertionError("broker serve did not become ready")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BROKER, *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield from _data_dir(tmp_path)


def test_serve_with_no_configuration_starts_shares_survives_a_restart_and_stops_on_sigterm(
    data_dir: Path,
) -> None:
    served = Served(data_dir)
    cold = served.wait_ready()
    print(f"cold data directory: ready in {cold:.2f}s")
    server_pid = postmaster_pid(data_dir)
    assert server_pid is not None and alive(server_pid)

    # A second process on the same data directory shares the running server.
    added = served.cli("domain", "add", "D2", "--push", "--scim-url", "http://peer.example/scim/v2")
    assert added.returncode == 0, added.stderr
    assert "push:        yes" in added.stdout
    issued = served.cli("token", "issue", "D2", "--expires-in", "90d")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert token.startswith("bkr_") and "\n" not in token  # the token alone on stdout
    assert "shown once" in issued.stderr
    listed_tokens = served.cli("token", "list")
    assert token[:10] in listed_tokens.stdout and token not in listed_tokens.stdout
    assert postmaster_pid(data_dir) == server_pid and alive(server_pid)
    assert get(served.url + "/readyz")[0] == 200  # the CLI leaving did not stop it

    assert served.terminate() == 0
    assert "broker stopped" in served.output
    for migration in load_migrations():  # each migration logged once, when it is applied
        assert served.output.count(migration.name) == 1, served.output
    deadline = time.monotonic() + 20
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server_pid), "SIGTERM left the embedded PostgreSQL running"

    again = Served(data_dir)
    warm = again.wait_ready()
    print(f"warm data directory: ready in {warm:.2f}s")
    listed = again.cli("domain", "list")
    assert listed.returncode == 0, listed.stderr
    assert "| D2     | peer | push |" in listed.stdout
    assert again.terminate() == 0
    assert "migration" not in again.output, "nothing to apply, nothing logged"


def test_serve_refuses_to_start_when_an_applied_migration_changed(data_dir: Path) -> None:
    served = Served(data_dir)
    served.wait_ready()
    # Record a different checksum, as if 0001 had been edited after it was applied.
    edited = served.cli("migrate")
    assert edited.returncode == 0 and "up to date" in edited.stdout
    server_pid = postmaster_pid(data_dir)
    socket_dir = data_dir
    subprocess.run(
        [
            str(Path(sys.executable).parent / "python"),
            "-c",
            "import asyncio, asyncpg, sys\n"
            "async def main():\n"
            "    c = await asyncpg.connect(sys.argv[1])\n"
            "    await c.execute(\"UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1\")\n"
            "    await c.close()\n"
            "asyncio.run(main())",
            f"postgresql://postgres@/postgres?host={socket_dir}",
        ],
        check=True,
        timeout=60,
    )
    assert served.terminate() == 0
    assert server_pid is not None

    refused = subprocess.run(
        [*BROKER, "serve"], env=served.env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "0001_initial.sql changed after it was applied" in refused.stderr
    assert "new numbered file" in refused.stderr
