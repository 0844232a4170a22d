"""The broker's own errors, each carrying its HTTP status and SCIM ``scimType`` (RFC 7644 section 3.12).

Pure: no I/O. The web layers turn them into SCIM error documents; the CLI prints their detail.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConflictError",
    "ForbiddenError",
    "InvalidValueError",
    "NotFoundError",
]


class BrokerError(Exception):
    """An error with a message a person can act on."""

    status: int = 500
    scim_type: str | None = None

    def __init__(
        self, detail: str, *, status: int | None = None, scim_type: str | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if scim_type is not None:
            self.scim_type = scim_type


class InvalidValueError(BrokerError, ValueError):
    status = 400
    scim_type = "invalidValue"


class NotFoundError(BrokerError, LookupError):
    status = 404


class ConflictError(BrokerError):
    status = 409
    scim_type = "uniqueness"


class ForbiddenError(BrokerError):
    """The caller is known but may not do this (a token without the scope, a push domain creating)."""

    status = 403
