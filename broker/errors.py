"""The broker's own errors, each carrying its HTTP status and SCIM ``scimType`` (RFC 7644 section 3.12).

Pure: no I/O. The web layers turn them into SCIM error documents; the CLI prints their detail.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["BrokerError", "ConflictError", "InvalidValueError", "NotFoundError"]


class BrokerError(Exception):
    """An error with a message a person can act on."""

    status: ClassVar[int] = 500
    scim_type: ClassVar[str | None] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidValueError(BrokerError, ValueError):
    status = 400
    scim_type = "invalidValue"


class NotFoundError(BrokerError, LookupError):
    status = 404


class ConflictError(BrokerError):
    status = 409
    scim_type = "uniqueness"
