"""Every attribute of every resource type, read from the home's ``/Schemas`` and ``/ResourceTypes``.

RFC 7643 section 2.1: attribute names are case-insensitive, and an attribute may be named with its
schema URN (``urn:ietf:params:scim:schemas:core:2.0:User:userName``). The request path resolves
every name a domain sends to one :class:`AttrRef` through this index, so two spellings of one
attribute are one attribute everywhere: in the write list, the read list, the rewriter and the
filters. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMON",
    "AttrRef",
    "Attribute",
    "ResourceSchema",
    "SchemaIndex",
]

# RFC 7643 section 3.1: attributes every resource has, whatever its schema.
COMMON = {"id": "id", "externalid": "externalId", "meta": "meta", "schemas": "schemas"}
_META_SUBS = ("resourceType", "created", "lastModified", "location", "version")


@dataclass(frozen=True)
class AttrRef:
    """One attribute, named canonically: its extension schema URN (None for core and common
    attributes) and its name, both as the schemas spell them."""

    extension: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.extension}:{self.name}" if self.extension else self.name


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str = "string"
    multi_valued: bool = False
    mutability: str = "readWrite"
    returned: str = "default"
    case_exact: bool = False
    sub_attributes: Mapping[str, Attribute] = field(default_factory=dict)
    """Sub-attributes by lower-case name; empty when the schema does not list them."""

    @classmethod
    def from_schema(cls, attr: Mapping[str, Any]) -> Attribute:
        subs = {
            str(s["name"]).lower(): cls.from_schema(s)
            for s in attr.get("subAttributes") or []
            if isinstance(s, Mapping) and isinstance(s.get("name"), str)
        }
        return cls(
            name=str(attr["name"]),
            type=str(attr.get("type", "string")),
            multi_valued=bool(attr.get("multiValued", False)),
            mutability=str(attr.get("mutability", "readWrite")),
            returned=str(attr.get("returned", "default")),
            case_exact=bool(attr.get("caseExact", False)),
            sub_attributes=subs,
        )

    def sub(self, name: str) -> Attribute | None:
        return self.sub_attributes.get(name.lower())


_COMMON_ATTRS = {
    "id": Attribute("id", mutability="readOnly", case_exact=True),
    "externalid": Attribute("externalId", case_exact=True),
    "meta": Attribute(
        "meta",
        type="complex",
        mutability="readOnly",
        sub_attributes={s.lower(): Attribute(s, mutability="readOnly") for s in _META_SUBS},
    ),
    "schemas": Attribute("schemas", multi_valued=True, type="reference"),
}


@dataclass(frozen=True)
class ResourceSchema:
    """The attributes of one resource type: its core schema's and its extensions'."""

    name: str
    core: str
    """The core schema URN, as the schema spells it."""
    attributes: Mapping[str, Attribute]
    """Core attributes by lower-case name (the common ones included)."""
    extensions: Mapping[str, tuple[str, Mapping[str, Attribute]]]
    """Extension URN (lower-case) -> (URN as spelt, its attributes by lower-case name)."""

    def extension(self, urn: str) -> str | None:
        """The extension's URN as spelt, if ``urn`` names one of this type's extensions."""
        found = self.extensions.get(urn.lower())
        return found[0] if found else None

    def resolve(self, key: str) -> tuple[AttrRef, Attribute] | None:
        """The attribute ``key`` names at the top level of a resource: a plain name (core, or of
        exactly one extension), or a name qualified with its schema URN. None if none."""
        lowered = key.lower()
        if ":" in lowered:
            urn, _, name = lowered.rpartition(":")
            if urn == self.core.lower():
                attr = self.attributes.get(name)
                return (AttrRef(None, attr.name), attr) if attr else None
            found = self.extensions.get(urn)
            if found is None:
                return None
            attr = found[1].get(name)
            return (AttrRef(found[0], attr.name), attr) if attr else None
        attr = self.attributes.get(lowered)
        if attr is not None:
            return AttrRef(None, attr.name), attr
        owners = [(u, attrs[lowered]) for u, attrs in self.extensions.values() if lowered in attrs]
        if len(owners) == 1:
            urn, attr = owners[0]
            return AttrRef(urn, attr.name), attr
        return None

    def attribute(self, ref: AttrRef) -> Attribute | None:
        if ref.extension is None:
            return self.attributes.get(ref.name.lower())
        found = self.extensions.get(ref.extension.lower())
        return found[1].get(ref.name.lower()) if found else None

    def all_refs(self) -> list[AttrRef]:
        refs = [AttrRef(None, a.name) for a in self.attributes.values()]
        for urn, attrs in self.extensions.values():
            refs.extend(AttrRef(urn, a.name) for a in attrs.values())
        return refs


@dataclass(frozen=True)
class SchemaIndex:
    """Every resource type's attributes, by resource type name."""

    by_type: Mapping[str, ResourceSchema]

    @classmethod
    def from_schemas(
        cls, schemas: Iterable[Mapping[str, Any]], resource_types: Iterable[Mapping[str, Any]]
    ) -> SchemaIndex:
        by_id = {
            str(s["id"]).lower(): s
            for s in schemas
            if isinstance(s, Mapping) and isinstance(s.get("id"), str)
        }
        found: dict[str, ResourceSchema] = {}
        for rt in resource_types:
            if not isinstance(rt, Mapping) or not isinstance(rt.get("name"), str):
                continue
            core_id = str(rt.get("schema", ""))
            core = by_id.get(core_id.lower(), {"attributes": []})
            extensions: dict[str, tuple[str, Mapping[str, Attribute]]] = {}
            for ext in rt.get("schemaExtensions") or []:
                urn = ext.get("schema") if isinstance(ext, Mapping) else None
                if isinstance(urn, str):
                    extensions[urn.lower()] = (urn, _attributes(by_id.get(urn.lower(), {})))
            found[str(rt["name"])] = ResourceSchema(
                str(rt["name"]),
                core_id,
                {**_attributes(core), **_COMMON_ATTRS},
                extensions,
            )
        return cls(found) if found else cls.default()

    @classmethod
    def default(cls) -> SchemaIndex:
        """What RFC 7643 defines (User with the enterprise extension, Group), for a home whose
        ``/Schemas`` cannot be read."""
        from scim2_models import EnterpriseUser, Group, User

        def dump(model: Any) -> dict[str, Any]:
            return dict(model.to_schema().model_dump(mode="json", by_alias=True, exclude_none=True))

        user, group, enterprise = dump(User), dump(Group), dump(EnterpriseUser)
        return cls.from_schemas(
            [user, group, enterprise],
            [
                {
                    "name": "User",
                    "schema": user["id"],
                    "schemaExtensions": [{"schema": enterprise["id"]}],
                },
                {"name": "Group", "schema": group["id"]},
            ],
        )

    def get(self, resource_type: str | None) -> ResourceSchema | None:
        return self.by_type.get(resource_type) if resource_type else None


def _attributes(schema: Mapping[str, Any]) -> dict[str, Attribute]:
    return {
        str(a["name"]).lower(): Attribute.from_schema(a)
        for a in schema.get("attributes") or []
        if isinstance(a, Mapping) and isinstance(a.get("name"), str)
    }
