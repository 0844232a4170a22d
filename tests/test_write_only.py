"""Write-only attributes (a password): which values a write sets, pure; and how they are sealed
while they wait in the outbox."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError
from broker.scim.bulk import bulk_write_only
from broker.scim.rewrite import Endpoints
from broker.scim.writeonly import DEFAULT_WRITE_ONLY, write_only_values
from broker.secrets import SealError, SecretBox, load_box

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def ops(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH], "Operations": list(operations)}


@pytest.mark.parametrize(
    ("method", "body", "expected"),
    [
        ("POST", {"userName": "a", "password": "s1"}, {"password": "s1"}),
        ("PUT", {"userName": "a", "Password": "s1"}, {"password": "s1"}),
        ("POST", {"userName": "a"}, {}),
        ("POST", {"userName": "a", "password": None}, {}),
        ("PATCH", ops({"op": "replace", "path": "password", "value": "s2"}), {"password": "s2"}),
        ("PATCH", ops({"op": "Add", "path": "PASSWORD", "value": "s2"}), {"password": "s2"}),
        (
            "PATCH",
            ops({"op": "replace", "path": f"{CORE_USER}:password", "value": "s2"}),
            {"password": "s2"},
        ),
        (
            "PATCH",
            ops({"op": "replace", "value": {"password": "s3", "title": "x"}}),
            {"password": "s3"},
        ),
        (
            "PATCH",
            ops(
                {"op": "replace", "path": "password", "value": "old"},
                {"op": "replace", "path": "password", "value": "new"},
            ),
            {"password": "new"},
        ),
        ("PATCH", ops({"op": "remove", "path": "password"}), {}),
        ("PATCH", ops({"op": "replace", "path": "title", "value": "password"}), {}),
        ("DELETE", None, {}),
        ("POST", ["not", "an", "object"], {}),
        ("PATCH", {"Operations": "garbage"}, {}),
    ],
)
def test_the_values_a_write_sets(method: str, body: Any, expected: dict[str, Any]) -> None:
    assert write_only_values(method, body, DEFAULT_WRITE_ONLY) == expected


def test_the_names_come_from_homes_schemas() -> None:
    body = {"userName": "a", "password": "p", "pin": "1234"}
    assert write_only_values("POST", body, {"pin"}) == {"pin": "1234"}


def test_bulk_values_are_paired_with_the_resources_written() -> None:
    requests = [
        {"method": "POST", "path": "/Users", "bulkId": "b1", "data": {"password": "p1"}},
        {
            "method": "PATCH",
            "path": "/Users/u2",
            "data": ops({"op": "replace", "path": "password", "value": "p2"}),
        },
        {"method": "POST", "path": "/Users", "bulkId": "b3", "data": {"password": "p3"}},
        {"method": "DELETE", "path": "/Users/u4"},
    ]
    answers = [
        # Answered out of order for the bulkIds; the failed one sets nothing.
        {"method": "POST", "bulkId": "b3", "status": "409"},
        {"method": "PATCH", "location": "http://home/v2/Users/u2", "status": "200"},
        {"method": "POST", "bulkId": "b1", "location": "http://home/v2/Users/u1", "status": "201"},
        {"method": "DELETE", "location": "http://home/v2/Users/u4", "status": "204"},
    ]
    found = bulk_write_only(requests, answers, Endpoints.default(), "http://home/v2", {"password"})
    assert found == {"u1": {"password": "p1"}, "u2": {"password": "p2"}}


def test_sealed_values_open_with_the_same_key_only() -> None:
    box = SecretBox(bytes(range(32)))
    sealed = box.seal({"password": "s3cr3t"})
    assert b"s3cr3t" not in sealed
    assert sealed != box.seal({"password": "s3cr3t"}), "a fresh nonce each time"
    assert box.open(sealed) == {"password": "s3cr3t"}
    with pytest.raises(SealError, match="secret_key_env"):
        SecretBox(bytes(32)).open(sealed)
    with pytest.raises(SealError):
        box.open(sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_the_default_key_is_a_file_of_the_data_directory_only_its_owner_reads(
    tmp_path: Path,
) -> None:
    box = load_box(None, tmp_path / "data")
    key_file = tmp_path / "data" / "outbox.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = load_box(None, tmp_path / "data")
    assert again.open(box.seal({"password": "x"})) == {"password": "x"}, "the same key is kept"


def test_a_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
    monkeypatch.setenv("OUTBOX_KEY", key)
    sealed = load_box("OUTBOX_KEY", tmp_path).seal({"password": "x"})
    assert SecretBox(bytes(range(32))).open(sealed) == {"password": "x"}
    assert not (tmp_path / "outbox.key").exists()
    for wrong in ("c2hvcnQ", "not base64!"):
        monkeypatch.setenv("OUTBOX_KEY", wrong)
        with pytest.raises(ConfigError, match="32 random bytes, base64url"):
            load_box("OUTBOX_KEY", tmp_path)
    monkeypatch.delenv("OUTBOX_KEY")
    with pytest.raises(ConfigError, match="OUTBOX_KEY, which is not set"):
        load_box("OUTBOX_KEY", tmp_path)
