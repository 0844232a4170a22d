"""Logging as the operator asks (``[log] format`` and ``level``): text lines or JSON lines, one
access line per HTTP request carrying the request's correlation ID, never a credential.

Each request gets a correlation ID of the broker's own (a domain cannot choose it, so a domain
cannot forge or collide with another's lines). It is answered in the ``X-Request-ID`` header,
carried by every record logged while the request is served, and named in the SCIM error a 500
or a leak-guard block answers, so an operator finds the lines a caller quotes. Every handler
:func:`configure_logging` installs keeps :class:`broker.logsafe.RedactingFilter` in its path,
and the JSON formatter masks every string field it adds, so no bearer token, broker token or
``Authorization`` value reaches the log in either format.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

import orjson
from aiohttp import web

from broker.config import LogConfig
from broker.logsafe import RedactingFilter, redact

__all__ = [
    "ACCESS_LOGGER",
    "REQUEST_ID_HEADER",
    "CorrelationFilter",
    "JsonFormatter",
    "access_log",
    "configure_logging",
    "correlation_id",
]

ACCESS_LOGGER = "broker.access"
REQUEST_ID_HEADER = "X-Request-ID"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "broker_correlation_id", default=None
)
# Attributes every LogRecord has: what is left over was passed with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "correlation_id",
}
_ACCESS = logging.getLogger(ACCESS_LOGGER)


def _new_id() -> str:
    # 64 random bits from the kernel, as uuid4's first 16 hex digits were, without the UUID.
    return os.urandom(8).hex()


def correlation_id() -> str:
    """The correlation ID of the request being served, or a fresh one outside a request."""
    return _CURRENT.get() or _new_id()


class CorrelationFilter(logging.Filter):
    """Gives each record ``correlation_id``: the request's, or ``-`` outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = _CURRENT.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``correlation_id`` when there is one, ``exception`` when there is one, and every ``extra``
    field, its strings masked (:func:`broker.logsafe.redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        correlation = getattr(record, "correlation_id", None)
        if correlation and correlation != "-":
            entry["correlation_id"] = correlation
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = _masked(value)
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return orjson.dumps(entry, default=str).decode()


def _masked(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


def configure_logging(config: LogConfig, stream: IO[str] | None = None) -> logging.Handler:
    """The root logger writes to ``stream`` (standard error) in ``config``'s format and level,
    through the redacting and correlation filters; any handler it had before goes. Returns
    the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(CorrelationFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    _ACCESS.disabled = not config.access
    global _WRITER
    _WRITER = _AccessWriter(handler, json_lines=config.format == "json")
    # No format here prints a record's process or process name (the JSON one leaves every
    # standard attribute out): not reading them saves a getpid() and a lookup per record, about
    # 3 of the access line's microseconds (issue 15).
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return handler


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the request's correlation ID for everything it logs, answered in
    ``X-Request-ID``, and one access line with the status the client got. The path is logged
    without its query (filters name people); the line never holds a header."""
    token = _CURRENT.set(_new_id())
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = _CURRENT.get() or ""
        return response
    except web.HTTPException as exc:
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = _CURRENT.get() or ""
        raise
    finally:
        if _ACCESS.isEnabledFor(logging.INFO):  # no record at all when the access log is off
            _access_line(request, status, time.perf_counter() - started)
        _CURRENT.reset(token)


class _AccessWriter:
    """The access line written as the handler :func:`configure_logging` installed would write
    it, without a log record, its filters and its formatter (issue 15: they cost about 20 us a
    line). Only while that handler is the root's only one, with only its own filters, and no
    handler listens on the access logger itself (a test's capture, an operator's addition):
    otherwise the line is a record like any other."""

    def __init__(self, handler: logging.StreamHandler[Any], *, json_lines: bool) -> None:
        self.handler = handler
        self.json = json_lines
        self._alone = [handler]
        self._filters = list(handler.filters)
        self._second = -1
        self._stamp = ""

    def usable(self) -> bool:
        handler = self.handler
        return (
            logging.root.handlers == self._alone
            and not _ACCESS.handlers
            and _ACCESS.propagate
            and handler.filters == self._filters
            and handler.level <= logging.INFO
        )

    def line(self, method: str, path: str, status: int, seconds: float, remote: str) -> str:
        """The line (its end included) the handler would write, correlation ID and all."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the time stamp's seconds, formatted once a second
            self._second = second
            self._stamp = time.strftime(
                "%Y-%m-%dT%H:%M:%S" if self.json else "%Y-%m-%d %H:%M:%S",
                time.gmtime(second) if self.json else time.localtime(second),
            )
        millis = int((now - second) * 1000)
        message = redact(f"{method} {path} {status}")
        correlation = _CURRENT.get() or "-"
        if not self.json:
            return f"{self._stamp},{millis:03d} INFO {ACCESS_LOGGER} [{correlation}]: {message}\n"
        entry: dict[str, Any] = {
            "time": f"{self._stamp}.{millis:03d}Z",
            "level": "info",
            "logger": ACCESS_LOGGER,
            "message": message,
        }
        if correlation != "-":
            entry["correlation_id"] = correlation
        entry["method"] = redact(method)
        entry["path"] = redact(path)
        entry["status"] = status
        entry["duration_ms"] = round(seconds * 1000, 3)
        entry["remote"] = redact(remote)
        return orjson.dumps(entry).decode() + "\n"

    def write(self, line: str) -> bool:
        """Whether ``line`` was written (False: the caller logs it as a record instead)."""
        handler = self.handler
        try:
            with handler.lock:  # type: ignore[union-attr]
                handler.stream.write(line)
                handler.stream.flush()
        except Exception:  # logged as a record instead, where logging handles the error
            return False
        return True


_WRITER: _AccessWriter | None = None


def _access_line(request: web.BaseRequest, status: int, seconds: float) -> None:
    """The access line: written directly (:class:`_AccessWriter`) where it can be, else
    handled as ``_ACCESS.info`` would, less its look for the caller's file and line (about
    3 us, and no format prints them)."""
    method, path = request.method, request.path
    writer = _WRITER
    if (
        writer is not None
        and writer.usable()
        and writer.write(writer.line(method, path, status, seconds, request.remote or "-"))
    ):
        return
    record = _ACCESS.makeRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        0,
        "%s %s %d",
        (method, path, status),
        None,
        "access_log",
        {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "remote": request.remote or "-",
        },
    )
    _ACCESS.handle(record)
