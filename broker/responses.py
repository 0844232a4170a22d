"""SCIM error documents and responses (RFC 7644 section 3.12), for every listener.

Base floor: the proxy, the admin listener and the events endpoints all answer errors this way,
so it lives below them all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from broker.errors import BrokerError
from broker.http import SCIM_JSON
from broker.logs import correlation_id

__all__ = [
    "DATABASE_DOWN",
    "ERROR_SCHEMA",
    "MAX_BODY",
    "SCIM_PREFIX",
    "UnsupportedMediaType",
    "answer_errors",
    "client_gone",
    "error_document",
    "error_response",
    "scim_error_middleware",
]

log = logging.getLogger(__name__)

SCIM_PREFIX = "/scim/v2"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
# Largest request body a domain may send (RFC 7644 section 3.12: 413 beyond it).
MAX_BODY = 1024 * 1024


class UnsupportedMediaType(BrokerError):
    status = 415


def error_document(status: int, detail: str, scim_type: str | None = None) -> dict[str, Any]:
    """An RFC 7644 section 3.12 error."""
    doc: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(status), "detail": detail}
    if scim_type:
        doc["scimType"] = scim_type
    return doc


def error_response(status: int, detail: str, scim_type: str | None = None) -> web.Response:
    response = web.Response(
        status=status,
        body=orjson.dumps(error_document(status, detail, scim_type)),
        content_type=SCIM_JSON,
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="scim-id-broker"'
    return response


@web.middleware
async def scim_error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error under /scim/v2 is a SCIM error document, never an HTML page or a trace."""
    if not request.path.startswith(SCIM_PREFIX):
        return await handler(request)
    return await answer_errors(request, handler)


DATABASE_DOWN = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
"""What asyncpg raises while the database is restarting or unreachable: a 503, not a 500."""


def client_gone(request: web.BaseRequest, exc: BaseException) -> bool:
    """Whether ``exc`` is the calling client's connection going away (a reset while reading
    its body, or a transport already closed), not a failure of the broker's database."""
    if not isinstance(exc, ConnectionResetError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


async def answer_errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    before: Callable[[web.Request], web.Response | None] | None = None,
) -> web.StreamResponse:
    """``handler``'s response, or its failure as an RFC 7644 section 3.12 error document.
    ``before``: a check whose response, if it gives one, is answered instead of calling
    ``handler`` (its failures answered the same way)."""
    try:
        if before is not None:
            refusal = before(request)
            if refusal is not None:
                return refusal
        return await handler(request)
    except BrokerError as exc:
        return error_response(exc.status, exc.detail, exc.scim_type)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "the request body is too large for this broker (1 MiB at most)")
    except web.HTTPException as exc:
        if exc.status >= 400:
            detail = {404: "no such endpoint", 405: f"{request.method} is not allowed here"}
            return error_response(exc.status, detail.get(exc.status, exc.reason))
        raise
    except DATABASE_DOWN as exc:
        if client_gone(request, exc):
            # Not the database: the caller hung up while its body was being read (aiohttp
            # raises ConnectionResetError, an OSError). No one is left to answer.
            log.info(
                "client disconnected before its request was read: %s %s",
                request.method,
                request.path,
            )
            return error_response(
                400, "the client closed the connection before its request was read"
            )
        log.warning("database unavailable: %r", exc)
        return error_response(
            503, "the broker's database is unavailable; try again in a few seconds"
        )
    except Exception:
        correlation = correlation_id()
        log.exception("internal error, correlation ID %s", correlation)
        return error_response(500, f"internal error in the broker (correlation ID {correlation})")
