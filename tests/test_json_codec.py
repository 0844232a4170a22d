"""The connection's JSON encoder (orjson, with ``json`` for what orjson refuses) stores what
``json.dumps`` stored: the same values read back from a real PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from broker.db import encode_json

VALUES: list[Any] = [
    {"userName": "bjensen", "emails": [{"value": "b@example.com", "primary": True}]},
    {"name": "Zoë 東京 \u2028", "n": 1.5, "none": None, "list": [1, "2", [3]]},
    {"big": 10**30, "small": -(10**25)},  # beyond 64 bits: orjson refuses, json encodes
    {1: "an integer key", "x": (1, 2)},
    "a string",
    [],
]


@pytest.mark.parametrize("value", VALUES)
def test_the_encoder_means_what_json_dumps_means(value: Any) -> None:
    assert json.loads(encode_json(value)) == json.loads(json.dumps(value))


async def test_values_read_back_from_postgresql_unchanged(pool: asyncpg.Pool) -> None:
    for value in VALUES:
        back = await pool.fetchval("SELECT $1::jsonb", value)
        assert back == json.loads(json.dumps(value))
