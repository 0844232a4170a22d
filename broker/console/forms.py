"""The domain forms' decisions, as pure functions: a domain's settings as the form shows them,
and what a submitted form asks for as the admin API's JSON body (which
``broker.domainsettings.update_from_json`` then checks the one way every caller checks it).
Tested in tests/test_console_core.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.domains import Domain

__all__ = ["FIELDS", "add_body", "domain_form", "update_body"]

TEXTS = ("scim_url", "token_env", "token_file", "scope", "suspend_for")
LISTS = ("read_attributes", "write_attributes")
FLAGS = ("push", "unlinkable")
CHOICES = ("deprovision", "on_conflict")
FIELDS = (*TEXTS, *LISTS, *FLAGS, *CHOICES)
"""The form's fields, named as the admin API's PATCH members."""


def _suspend(domain: Domain) -> str:
    seconds = int(domain.suspend_for.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def domain_form(domain: Domain) -> dict[str, str]:
    """The domain's settings as the form's fields hold them (a flag: "on" or "")."""
    kind, _, place = (domain.credential_ref or "").partition(":")
    read, write = domain.attribute_policy.get("read"), domain.attribute_policy.get("write")
    return {
        "scim_url": domain.scim_url or "",
        "token_env": place if kind == "env" else "",
        "token_file": place if kind == "file" else "",
        "scope": domain.scope_filter or "",
        "suspend_for": _suspend(domain),
        "read_attributes": ", ".join(read) if read is not None else "",
        "write_attributes": ", ".join(write) if write is not None else "",
        "push": "on" if domain.push else "",
        "unlinkable": "on" if domain.unlinkable else "",
        "deprovision": domain.deprovision,
        "on_conflict": domain.on_conflict.replace("_", "-"),
    }


def _value(name: str, text: str) -> Any:
    """One field as the JSON body has it: a list split at commas, a flag, or the text (an
    empty one is None: the setting taken away)."""
    text = text.strip()
    if name in FLAGS:
        return text == "on"
    if not text:
        return None
    if name in LISTS:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _fields(form: Mapping[str, str]) -> dict[str, str]:
    return {name: str(form.get(name) or "") for name in FIELDS}


def add_body(form: Mapping[str, str]) -> dict[str, Any]:
    """A new domain's settings from the form: what was filled in (and both flags)."""
    body = {name: _value(name, text) for name, text in _fields(form).items()}
    return {name: value for name, value in body.items() if value is not None}


def update_body(form: Mapping[str, str], current: Mapping[str, str]) -> dict[str, Any]:
    """What the submitted form changes of ``current`` (:func:`domain_form`): the fields that
    differ, an emptied one as null (taken away). The credential's two fields go together."""
    given = _fields(form)
    changed = {
        name: _value(name, text)
        for name, text in given.items()
        if _value(name, text) != _value(name, current.get(name, ""))
    }
    if "token_env" in changed or "token_file" in changed:
        changed["token_env"] = _value("token_env", given["token_env"])
        changed["token_file"] = _value("token_file", given["token_file"])
    for name in ("suspend_for", "deprovision", "on_conflict"):
        if changed.get(name, "") is None:
            del changed[name]  # no value to take away: left as it is
    return changed
