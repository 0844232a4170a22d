"""A domain's settings as a request gives them (a JSON object: the admin API's PATCH, the
console's forms), read the one way every caller reads them: the types, the choices, the
credential's reference free of control characters. Pure. The scope filter and the credential's
place are checked by ``DomainStore.add`` and ``update`` (``settings_problem``), for the CLI too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.credentials import credential_ref
from broker.domains import DomainUpdate
from broker.errors import InvalidValueError
from broker.tokens import parse_duration

__all__ = ["KNOWN", "update_from_json"]

_FLAGS = ("push", "unlinkable")
_TEXTS = {"scim_url": "scim_url", "scope": "scope_filter"}
_LISTS = {"read_attributes": "read", "write_attributes": "write"}
KNOWN = {
    *_FLAGS,
    *_TEXTS,
    *_LISTS,
    "token_env",
    "token_file",
    "deprovision",
    "suspend_for",
    "on_conflict",
    "timestamp_precision",
}


def update_from_json(body: Mapping[str, Any]) -> DomainUpdate:
    """A PATCH body as the update it asks for (pure); InvalidValueError naming the member."""
    unknown = set(body) - KNOWN
    if unknown:
        raise InvalidValueError(
            f"unknown members {', '.join(sorted(unknown))}: a PATCH takes {', '.join(sorted(KNOWN))}"
        )
    fields: dict[str, Any] = {}
    clear: set[str] = set()
    for key in _FLAGS:
        if key in body:
            if not isinstance(body[key], bool):
                raise InvalidValueError(f'"{key}" is true or false')
            fields[key] = body[key]
    for key, name in {**_TEXTS, **_LISTS}.items():
        if key not in body:
            continue
        value = body[key]
        if value is None:
            clear.add(name)
        elif _well_typed(key, value):
            fields[name] = value
        else:
            kind = "a list of attribute names" if key in _LISTS else "a non-empty string"
            raise InvalidValueError(f'"{key}" is {kind}, or null to take it away')
    if "token_env" in body or "token_file" in body:
        env, file = body.get("token_env"), body.get("token_file")
        if not all(v is None or (isinstance(v, str) and v) for v in (env, file)) or (env and file):
            raise InvalidValueError('give "token_env" or "token_file" (a string), or null for none')
        if any(
            isinstance(v, str) and any(ord(c) < 0x20 or c == "\x7f" for c in v) for v in (env, file)
        ):
            raise InvalidValueError(
                '"token_env" and "token_file" hold no control character (a NUL, a newline): '
                "name the variable or the file as it is"
            )
        ref = credential_ref(env, file)
        if ref is None:
            clear.add("credential_ref")
        else:
            fields["credential_ref"] = ref
    fields.update(_choices(body))
    return DomainUpdate(**fields, clear=frozenset(clear))


def _well_typed(key: str, value: Any) -> bool:
    if key in _LISTS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str) and bool(value)


def _choices(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "deprovision" in body:
        if body["deprovision"] not in ("delete", "suspend"):
            raise InvalidValueError('"deprovision" is "delete" or "suspend"')
        out["deprovision"] = body["deprovision"]
    if "on_conflict" in body:
        value = str(body["on_conflict"]).replace("-", "_")
        if value not in ("link", "dead_letter"):
            raise InvalidValueError('"on_conflict" is "link" or "dead-letter"')
        out["on_conflict"] = value
    if "suspend_for" in body:
        if not isinstance(body["suspend_for"], str):
            raise InvalidValueError('"suspend_for" is a duration such as "30d"')
        out["suspend_for"] = parse_duration(body["suspend_for"])
    if "timestamp_precision" in body:
        value = body["timestamp_precision"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValueError('"timestamp_precision" is a whole number of seconds')
        out["timestamp_precision"] = value
    return out
