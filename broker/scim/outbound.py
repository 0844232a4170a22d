"""Home's resources as one domain sees them: the outbound half of the proxy, pure.

The shell asks the store once for every ID :func:`ids_in_resources` lists, then hands the answers
to :func:`resources_for_domain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.scim.rewrite import InvisibleResource, Translation, collect_ids, rewrite_document

__all__ = ["DomainView", "ids_in_resources", "resources_for_domain"]


@dataclass(frozen=True)
class DomainView:
    """How the domain knows one entity: its external ID, and the externalId it gave it."""

    external_id: str
    domain_external_id: str | None = None


def ids_in_resources(
    docs: Sequence[Mapping[str, Any]], translation: Translation, *, resource_type: str | None
) -> dict[str, str | None]:
    """Every internal ID the documents hold -> its resource type where it can be told.

    ``translation`` goes from home's base to the broker's.
    """
    wanted: dict[str, str | None] = {}
    for doc in docs:
        for internal, rtype in collect_ids(
            dict(doc), translation, resource_type=resource_type
        ).items():
            if wanted.get(internal) is None:
                wanted[internal] = rtype
    return wanted


def resources_for_domain(
    docs: Sequence[Mapping[str, Any]],
    views: Mapping[str, DomainView],
    translation: Translation,
    *,
    resource_type: str | None,
) -> list[dict[str, Any] | None]:
    """Each document as the domain sees it, or None where the resource is invisible to it.

    References to entities the domain has no view of are left out; home's ``externalId`` is
    replaced by the one the domain gave the entity, if any (DESIGN section 3).
    """

    def translate(internal: str, _rtype: str | None) -> str | None:
        return views[internal].external_id if internal in views else None

    out: list[dict[str, Any] | None] = []
    for doc in docs:
        try:
            new = rewrite_document(dict(doc), translation, translate, resource_type=resource_type)
        except InvisibleResource:
            out.append(None)
            continue
        for key in [k for k in new if k.lower() == "externalid"]:
            del new[key]
        view = views.get(doc["id"]) if isinstance(doc.get("id"), str) else None
        if view is not None and view.domain_external_id is not None:
            new["externalId"] = view.domain_external_id
        out.append(new)
    return out
