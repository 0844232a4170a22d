"""The deployment files: the Dockerfile builds an image that runs the broker as a non-root user
(only where Docker works and the base image is at hand; skipped with the reason elsewhere), and
the files the Dockerfile and the systemd unit name exist and say what docs/operations.md says."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "python:3.11-slim"


def _docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _docker_unavailable() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "no docker command on this machine"
    try:
        info = _docker("info", timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 20 s"
    if info.returncode != 0:
        return f"`docker info` fails: {(info.stderr or info.stdout).strip().splitlines()[-1:]}"
    if _docker("image", "inspect", BASE_IMAGE).returncode != 0:
        return f"the base image {BASE_IMAGE} is not available locally (no pull in tests)"
    return None


def test_the_dockerfile_copies_what_exists_and_runs_as_a_user_that_is_not_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is missing"
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert 'VOLUME ["/var/lib/scim-id-broker"]' in text
    assert "BROKER_DATA_DIR=/var/lib/scim-id-broker" in text
    assert 'ENTRYPOINT ["broker"]' in text and 'CMD ["serve"]' in text


def test_the_systemd_unit_runs_broker_serve_unprivileged_with_its_state_directory() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "scim-id-broker.service")
    service = unit["Service"]
    assert service["User"] not in ("root", "0")
    assert re.search(r"/broker serve\b", service["ExecStart"])
    assert service["StateDirectory"] == "scim-id-broker"
    assert service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.slow
def test_the_image_builds_and_runs_the_broker_as_a_non_root_user() -> None:
    reason = _docker_unavailable()
    if reason is not None:
        pytest.skip(f"Docker image not built: {reason}")
    tag = f"scim-id-broker-test:{uuid.uuid4().hex[:8]}"
    built = _docker("build", "--pull=false", "-t", tag, str(ROOT), timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        version = _docker("run", "--rm", tag, "--version")
        assert version.returncode == 0 and version.stdout.startswith("broker "), version.stderr
        uid = _docker("run", "--rm", "--entrypoint", "id", tag, "-u")
        assert uid.returncode == 0 and uid.stdout.strip() not in ("", "0"), uid.stdout
    finally:
        _docker("image", "rm", "-f", tag)
