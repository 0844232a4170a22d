"""Where a SCIM resource holds references to other resources, read from the home's ``/Schemas``.

RFC 7643 section 2.3.7: an attribute of type ``reference`` whose ``referenceTypes`` name resource
types (``User``, ``Group``, ...) points at a resource by URI. When it is the ``$ref`` of a complex
attribute, that attribute's ``value`` holds the resource's ``id`` (``members``, ``groups``,
``manager``). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_REFERENCES", "ENTERPRISE_USER", "RefAttr", "ReferenceMap"]

ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
# Reference types that do not name a resource type of the service.
_NOT_RESOURCES = {"external", "uri"}


@dataclass(frozen=True)
class RefAttr:
    """An attribute that refers to resources of the service."""

    name: str
    """The attribute's name, lower-cased (SCIM attribute names are case-insensitive)."""
    complex: bool
    """True: a complex attribute whose ``value`` is an ID and ``$ref`` a URI; False: a URI."""
    multi_valued: bool
    resource_types: frozenset[str]


@dataclass(frozen=True)
class ReferenceMap:
    """Reference attributes by schema: core attributes by name, extension ones by URN then name."""

    core: Mapping[str, RefAttr] = field(default_factory=dict)
    extensions: Mapping[str, Mapping[str, RefAttr]] = field(default_factory=dict)
    # Unqualified names: core attributes, then extension ones (services commonly accept those
    # unqualified too, and an ID hiding there must not slip through).
    _unqualified: Mapping[str, RefAttr] = field(init=False, repr=False, compare=False)
    _keys: dict[tuple[str, str | None], tuple[bool, RefAttr | None]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        merged: dict[str, RefAttr] = {}
        for attrs in self.extensions.values():
            for name, attr in attrs.items():
                merged.setdefault(name, attr)
        object.__setattr__(self, "_unqualified", {**merged, **self.core})
        object.__setattr__(self, "_keys", {})

    def classify(self, key: str, extension: str | None = None) -> tuple[bool, RefAttr | None]:
        """``(is_extension(key), attribute(key, extension))`` (the first always False inside an
        extension), decided once per key: home's resources repeat the same few dozen keys."""
        found = self._keys.get((key, extension))
        if found is None:
            found = (
                extension is None and self.is_extension(key),
                self.attribute(key, extension),
            )
            if len(self._keys) < 4096:  # never an unbounded memo, whatever home sends
                self._keys[key, extension] = found
        return found

    @classmethod
    def from_schemas(
        cls, schemas: Iterable[Mapping[str, Any]], resource_types: Iterable[Mapping[str, Any]] = ()
    ) -> ReferenceMap:
        """Build the map from ``/Schemas`` resources (and ``/ResourceTypes`` to tell extensions)."""
        extension_ids = {
            ext["schema"].lower()
            for rt in resource_types
            for ext in rt.get("schemaExtensions", []) or []
            if "schema" in ext
        }
        core: dict[str, RefAttr] = {}
        extensions: dict[str, dict[str, RefAttr]] = {}
        for schema in schemas:
            schema_id = str(schema.get("id", ""))
            is_extension = schema_id.lower() in extension_ids or ":extension:" in schema_id.lower()
            target = extensions.setdefault(schema_id.lower(), {}) if is_extension else core
            for attr in schema.get("attributes", []) or []:
                ref = _ref_attr(attr)
                if ref is not None:
                    target[ref.name] = ref
        return cls(core, {urn: attrs for urn, attrs in extensions.items() if attrs})

    def attribute(self, name: str, extension: str | None = None) -> RefAttr | None:
        if extension is None:
            return self._unqualified.get(name.lower())
        return self.extensions.get(extension.lower(), {}).get(name.lower())

    def is_extension(self, key: str) -> bool:
        return key.lower() in self.extensions


def _resource_types(attr: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(t for t in attr.get("referenceTypes", []) or [] if t not in _NOT_RESOURCES)


def _ref_attr(attr: Mapping[str, Any]) -> RefAttr | None:
    name = str(attr.get("name", "")).lower()
    multi = bool(attr.get("multiValued", False))
    if attr.get("type") == "reference":
        types = _resource_types(attr)
        return RefAttr(name, False, multi, types) if types else None
    if attr.get("type") == "complex":
        for sub in attr.get("subAttributes", []) or []:
            if sub.get("name") == "$ref" and sub.get("type") == "reference":
                types = _resource_types(sub)
                if types:
                    return RefAttr(name, True, multi, types)
    return None


DEFAULT_REFERENCES = ReferenceMap(
    core={
        "members": RefAttr("members", True, True, frozenset({"User", "Group"})),
        "groups": RefAttr("groups", True, True, frozenset({"Group"})),
    },
    extensions={
        ENTERPRISE_USER.lower(): {"manager": RefAttr("manager", True, False, frozenset({"User"}))}
    },
)
"""What RFC 7643 defines, for a home whose ``/Schemas`` cannot be read."""
