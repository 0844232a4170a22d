"""The mapping table drawn as seed 002 draws it (internal entity ID, domain, external ID,
primary flag, and the row's state): one renderer for the demo, ``broker mappings``,
``broker history`` and the dry runs of merge and split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from broker.mapping.rules import CANCEL_KINDS, MappingRow, Plan
from broker.output import table

__all__ = ["TABLE_HEADER", "TASK_HEADER", "mapping_table", "peer_tasks", "plan_json", "row_json"]

TABLE_HEADER = (
    "Internal Entity ID",
    "External Domain ID",
    "External Entity ID",
    "Primary flag",
    "state",
)


def mapping_table(rows: Iterable[MappingRow]) -> str:
    """The rows, in the order given; a pending create shows as ``(pending)``."""
    cells = [
        (
            r.internal_id,
            r.domain,
            r.external_id or "(pending)",
            str(r.primary).lower(),
            r.state.value,
        )
        for r in rows
    ]
    return table(TABLE_HEADER, cells)


TASK_HEADER = ("Domain", "Task", "Internal Entity ID", "Details")


def peer_tasks(plan: Plan) -> list[tuple[str, str, str, str]]:
    """What each peer will get from ``plan``, in order: the outbox tasks (cancellations settle
    at once), the syncs of accounts that changed hands and of eager split-offs, and the merge
    and split notices (SETs) for subscribed domains."""
    out: list[tuple[str, str, str, str]] = []
    for task in plan.tasks:
        detail = []
        if task.external_id is not None:
            detail.append(f"external ID {task.external_id}")
        if task.target_external_id is not None:
            detail.append(f"memberships to {task.target_external_id}")
        if task.kind in CANCEL_KINDS:
            detail.append("pending task cancelled, nothing sent")
        out.append((task.domain, task.kind.value, task.internal_id, "; ".join(detail) or "-"))
    for handover in plan.handovers:
        out.append(
            (handover.domain, "sync", handover.internal_id, f"after {handover.previous}'s work")
        )
    for domain, entity in plan.syncs:
        out.append((domain, "sync", entity, "provisioned now (eager split)"))
    for notice in plan.notices:
        out.append(
            (
                notice.domain,
                f"{notice.kind} notice (SET)",
                notice.internal_id,
                f"external ID {notice.external_id} now denotes the entity whose ID there is "
                f"{notice.primary or '(none yet)'}",
            )
        )
    return out


def row_json(row: MappingRow) -> dict[str, Any]:
    return {
        "internalId": row.internal_id,
        "domain": row.domain,
        "externalId": row.external_id,
        "primary": row.primary,
        "state": row.state.value,
    }


def plan_json(before: list[MappingRow], after: list[MappingRow], plan: Plan) -> dict[str, Any]:
    """A dry run as JSON: the table before and after, and each peer's tasks."""
    return {
        "dryRun": True,
        "before": [row_json(r) for r in before],
        "after": [row_json(r) for r in after],
        "tasks": [
            {"domain": d, "task": t, "internalId": e, "details": x}
            for d, t, e, x in peer_tasks(plan)
        ],
    }
