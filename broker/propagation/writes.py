"""What a write home took means for the broker: a :class:`HomeWrite`, built by pure classifiers.

Every source of change in home (a domain's write through the proxy, Bulk, home's own tools on
the admin listener, home's pushed SETs, the home poller and its sweep) describes what happened
as one value, and one function records it (:func:`broker.propagation.journal.record`): the
entities, the domain's own externalId values, the syncs toward push peers with the write-only
values sealed, and the changes the SETs will report. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.scim.bulk import bulk_write_only, bulk_writes
from broker.scim.rewrite import Endpoints
from broker.scim.writeonly import write_only_values

__all__ = ["HomeWrite"]


@dataclass(frozen=True)
class HomeWrite:
    """One write home took, or changes found in home."""

    written: Mapping[str, str] = field(default_factory=dict)
    """Internal ID -> resource type of every entity created or changed."""
    deleted: Sequence[str] = ()
    origin: str | None = None
    """The domain that wrote it: its push copy is not sent back there. None: home itself."""
    verbs: Mapping[str, str] = field(default_factory=dict)
    """How each entity was written (create, put, patch); absent: found by a poll."""
    documents: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Home's resources after the write, where known (what the SETs compare)."""
    write_only: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The write-only values (a password) the write set, by entity: sealed for push peers."""
    external_ids: Mapping[str, str | None] = field(default_factory=dict)
    """The externalId ``origin`` gave each entity (None: cleared): that domain's own value."""

    def __bool__(self) -> bool:
        return bool(self.written or self.deleted or self.external_ids)

    @classmethod
    def of_resource(
        cls,
        internal_id: str,
        resource_type: str,
        *,
        verb: str,
        origin: str | None,
        document: Mapping[str, Any] | None = None,
        write_only: Mapping[str, Any] | None = None,
        external_id: tuple[str | None] | None = None,
    ) -> HomeWrite:
        """One resource created (``verb`` create) or changed (put, patch)."""
        return cls(
            written={internal_id: resource_type},
            origin=origin,
            verbs={internal_id: verb},
            documents={internal_id: document} if document else {},
            write_only={internal_id: write_only} if write_only else {},
            external_ids={internal_id: external_id[0]} if external_id is not None else {},
        )

    @classmethod
    def of_deletion(cls, internal_ids: Iterable[str], *, origin: str | None = None) -> HomeWrite:
        return cls(deleted=tuple(internal_ids), origin=origin)

    @classmethod
    def of_bulk(
        cls,
        forwarded: Sequence[Mapping[str, Any]],
        answers: Sequence[Mapping[str, Any]],
        *,
        endpoints: Endpoints,
        home_base: str,
        write_only_names: Iterable[str],
        origin: str | None,
        external_ids: Mapping[str, str | None] | None = None,
    ) -> HomeWrite:
        """What a bulk response (RFC 7644 section 3.7.3) says home wrote, with the write-only
        values each successful request of ``forwarded`` set."""
        written, deleted, verbs = bulk_writes(answers, endpoints, home_base)
        return cls(
            written=written,
            deleted=tuple(deleted),
            origin=origin,
            verbs=verbs,
            write_only=bulk_write_only(forwarded, answers, endpoints, home_base, write_only_names),
            external_ids=external_ids or {},
        )

    @classmethod
    def of_home_tool(
        cls,
        method: str,
        path: str,
        sent: Any,
        answer: Any,
        *,
        endpoints: Endpoints,
        home_base: str,
        write_only_names: Iterable[str],
    ) -> HomeWrite:
        """A write home's own tools made through the admin listener (``path`` under home's SCIM
        base; ``sent`` the request's JSON, ``answer`` home's), as home's own change."""
        names = tuple(write_only_names)
        parts = path.strip("/").split("/")
        resource_type = endpoints.type_of(parts[0]) if parts else None
        if resource_type is not None and len(parts) == 1 and method == "POST":
            if isinstance(answer, Mapping) and isinstance(answer.get("id"), str):
                return cls.of_resource(
                    answer["id"],
                    resource_type,
                    verb="create",
                    origin=None,
                    document=answer,
                    write_only=write_only_values(method, sent, names),
                )
        elif resource_type is not None and len(parts) == 2:
            if method == "DELETE":
                return cls.of_deletion([parts[1]])
            own = isinstance(answer, Mapping) and answer.get("id") == parts[1]
            return cls.of_resource(
                parts[1],
                resource_type,
                verb=method.lower(),
                origin=None,
                document=answer if own else None,
                write_only=write_only_values(method, sent, names),
            )
        elif parts == ["Bulk"] and isinstance(answer, Mapping):
            answers = [a for a in answer.get("Operations") or [] if isinstance(a, Mapping)]
            requests = sent.get("Operations") if isinstance(sent, Mapping) else None
            forwarded = (
                [r for r in requests if isinstance(r, Mapping)]
                if isinstance(requests, list)
                else []
            )
            return cls.of_bulk(
                forwarded,
                answers,
                endpoints=endpoints,
                home_base=home_base,
                write_only_names=names,
                origin=None,
            )
        return cls()

    def unread(self) -> dict[str, str]:
        """The entities written whose resource after the write is not known (home answered
        204, or a bulk): the SETs need them read back."""
        return {i: t for i, t in self.written.items() if i not in self.documents}

    def with_documents(self, documents: Mapping[str, Mapping[str, Any]]) -> HomeWrite:
        from dataclasses import replace

        return replace(self, documents={**documents, **self.documents})
